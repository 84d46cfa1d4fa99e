//! Zero-copy GGUF reader: a total parser over a memory mapping.
//!
//! Opening a file maps it and parses only the header, metadata and tensor table; tensor data is
//! never read or copied — [`GgufFile::tensor_data`] returns a slice borrowed from the mapping.
//! Metadata arrays (the tokenizer's 128k strings, say) are kept as byte ranges and decoded when
//! iterated, so opening allocates memory proportional to the number of keys and tensors only.
//!
//! The input is treated as hostile. Every read goes through a bounds-checked cursor with checked
//! arithmetic; every count is checked against the bytes that remain before it is used, so no
//! declared count can make us allocate or loop beyond the file's size; the caps below bound what a
//! well-formed but absurd file can cost. Everything malformed is an [`Error::Gguf`], never a
//! panic: truncation anywhere, bad magic, version 1 or byte-swapped headers, unknown value types,
//! array nesting deeper than [`MAX_NESTING`], non-UTF-8 keys, duplicate keys or tensor names,
//! more than 4 dimensions, element counts that overflow, offsets that are misaligned, past the end
//! or overlapping, and tensor types whose meaning depends on the dialect (ids 36–39) when the byte
//! range does not settle it.

use super::types::{GgmlType, TypeInfo, ids};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use ternmux_kernels::ternary::TernaryFormat;

/// "GGUF" as the first four bytes.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Default `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Longest key accepted (llama.cpp has no limit; real keys are < 100 bytes).
pub const MAX_KEY_LEN: u64 = 64 * 1024;
/// Longest tensor name accepted (llama.cpp's `GGML_MAX_NAME` is 64; we are more lenient).
pub const MAX_TENSOR_NAME_LEN: u64 = 4096;
/// Deepest nesting of arrays inside arrays (the spec allows nesting; llama.cpp refuses it).
pub const MAX_NESTING: u32 = 8;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;

/// Metadata value type ids (ggml `gguf_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    /// u8
    U8 = 0,
    /// i8
    I8 = 1,
    /// u16
    U16 = 2,
    /// i16
    I16 = 3,
    /// u32
    U32 = 4,
    /// i32
    I32 = 5,
    /// f32
    F32 = 6,
    /// bool (one byte, 0 or 1)
    Bool = 7,
    /// UTF-8 string: u64 length + bytes
    String = 8,
    /// array: u32 element type, u64 count, elements
    Array = 9,
    /// u64
    U64 = 10,
    /// i64
    I64 = 11,
    /// f64
    F64 = 12,
}

impl ValueType {
    /// Maps a raw id.
    pub fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Size of a fixed-size value, `None` for strings and arrays.
    pub fn fixed_size(self) -> Option<u64> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

/// A metadata value as stored after parsing: scalars by value, strings and arrays as ranges.
#[derive(Clone, Debug)]
enum RawValue {
    Scalar(ValueType, u64), // bits of the value, zero-extended
    Str(Range<usize>),      // validated UTF-8
    Array {
        elem: ValueType,
        len: u64,
        bytes: Range<usize>,
    },
}

/// A borrowed metadata value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MetaValue<'a> {
    /// u8
    U8(u8),
    /// i8
    I8(i8),
    /// u16
    U16(u16),
    /// i16
    I16(i16),
    /// u32
    U32(u32),
    /// i32
    I32(i32),
    /// f32
    F32(f32),
    /// bool
    Bool(bool),
    /// string, borrowed from the file
    Str(&'a str),
    /// array, decoded lazily
    Array(MetaArray<'a>),
    /// u64
    U64(u64),
    /// i64
    I64(i64),
    /// f64
    F64(f64),
}

impl<'a> MetaValue<'a> {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as f64, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64).or(match *self {
                MetaValue::I8(v) => Some(v.into()),
                MetaValue::I16(v) => Some(v.into()),
                MetaValue::I32(v) => Some(v.into()),
                MetaValue::I64(v) => Some(v as f64),
                _ => None,
            }),
        }
    }
    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&'a str> {
        match *self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The array, if this is an array.
    pub fn as_array(&self) -> Option<MetaArray<'a>> {
        match *self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
    /// The bool, if this is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// The value's type.
    pub fn value_type(&self) -> ValueType {
        match self {
            MetaValue::U8(_) => ValueType::U8,
            MetaValue::I8(_) => ValueType::I8,
            MetaValue::U16(_) => ValueType::U16,
            MetaValue::I16(_) => ValueType::I16,
            MetaValue::U32(_) => ValueType::U32,
            MetaValue::I32(_) => ValueType::I32,
            MetaValue::F32(_) => ValueType::F32,
            MetaValue::Bool(_) => ValueType::Bool,
            MetaValue::Str(_) => ValueType::String,
            MetaValue::Array(_) => ValueType::Array,
            MetaValue::U64(_) => ValueType::U64,
            MetaValue::I64(_) => ValueType::I64,
            MetaValue::F64(_) => ValueType::F64,
        }
    }
}

impl fmt::Display for MetaValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::U8(v) => write!(f, "{v}"),
            MetaValue::I8(v) => write!(f, "{v}"),
            MetaValue::U16(v) => write!(f, "{v}"),
            MetaValue::I16(v) => write!(f, "{v}"),
            MetaValue::U32(v) => write!(f, "{v}"),
            MetaValue::I32(v) => write!(f, "{v}"),
            MetaValue::F32(v) => write!(f, "{v}"),
            MetaValue::Bool(v) => write!(f, "{v}"),
            MetaValue::Str(s) => write!(f, "{s:?}"),
            MetaValue::Array(a) => write!(f, "[{} x {}]", a.len(), a.elem_type().name()),
            MetaValue::U64(v) => write!(f, "{v}"),
            MetaValue::I64(v) => write!(f, "{v}"),
            MetaValue::F64(v) => write!(f, "{v}"),
        }
    }
}

/// A metadata array borrowed from the file; elements are decoded on iteration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MetaArray<'a> {
    elem: ValueType,
    len: u64,
    bytes: &'a [u8],
    depth: u32,
}

impl<'a> MetaArray<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len as usize
    }
    /// Whether the array is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Element type.
    pub fn elem_type(&self) -> ValueType {
        self.elem
    }
    /// Iterates the elements; a string that is not UTF-8 yields an error.
    pub fn iter(&self) -> MetaArrayIter<'a> {
        MetaArrayIter {
            cur: Cursor::new(self.bytes),
            elem: self.elem,
            left: self.len,
            depth: self.depth,
        }
    }
    /// All elements as strings (errors if any element is not a valid string).
    pub fn strings(&self) -> impl Iterator<Item = Result<&'a str>> + 'a {
        self.iter().map(|v| match v? {
            MetaValue::Str(s) => Ok(s),
            other => Err(Error::Gguf(format!(
                "expected a string array element, found {}",
                other.value_type().name()
            ))),
        })
    }
}

/// Iterator over a [`MetaArray`].
pub struct MetaArrayIter<'a> {
    cur: Cursor<'a>,
    elem: ValueType,
    left: u64,
    depth: u32,
}

impl<'a> Iterator for MetaArrayIter<'a> {
    type Item = Result<MetaValue<'a>>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let r = read_value(&mut self.cur, self.elem, self.depth, "array element")
            .and_then(|raw| materialize(self.cur.buf, &raw, self.depth));
        if r.is_err() {
            self.left = 0;
        }
        Some(r)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

/// A tensor's description from the tensor table.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    name: String,
    dims: [u64; 4],
    n_dims: u32,
    type_id: u32,
    ggml_type: std::result::Result<GgmlType, String>,
    offset: u64,
    range: Range<usize>,
}

impl TensorInfo {
    /// Tensor name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Dimensions, innermost (row length, `ne[0]`) first.
    pub fn dims(&self) -> &[u64] {
        &self.dims[..self.n_dims as usize]
    }
    /// Total number of elements.
    pub fn elements(&self) -> u64 {
        self.dims().iter().product()
    }
    /// The raw type id in the file.
    pub fn type_id(&self) -> u32 {
        self.type_id
    }
    /// The computable type, or why this tensor's type cannot be computed with.
    pub fn ggml_type(&self) -> Result<GgmlType> {
        self.ggml_type.clone().map_err(Error::Gguf)
    }
    /// Type name for display (dialect-qualified for clashing ids).
    pub fn type_name(&self) -> &'static str {
        match &self.ggml_type {
            Ok(t) => t.name(),
            Err(_) => TypeInfo::of(self.type_id).name,
        }
    }
    /// Offset relative to the start of the data section.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Absolute byte range in the file (for types of unknown size: up to the next tensor).
    pub fn file_range(&self) -> Range<usize> {
        self.range.clone()
    }
    /// Bytes of data.
    pub fn size(&self) -> usize {
        self.range.len()
    }
    /// Rows (`ne[1]·ne[2]·ne[3]`) and row length (`ne[0]`), as a 2-D view.
    pub fn rows_cols(&self) -> (usize, usize) {
        let d = self.dims();
        let cols = d.first().copied().unwrap_or(1) as usize;
        let rows = d.iter().skip(1).product::<u64>() as usize;
        (rows, cols)
    }
}

/// Where the file's bytes live.
enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: metadata and tensor table in memory, tensor data borrowed from the mapping.
///
/// ```no_run
/// let file = ternmux::gguf::GgufFile::open("models/bitllama2c-stories3M-TQ2_0.gguf")?;
/// println!("{} tensors, arch {:?}", file.tensors().len(), file.get_str("general.architecture"));
/// let t = file.tensor("blk.0.attn_q.weight").expect("tensor");
/// let bytes: &[u8] = file.tensor_data(t)?; // borrowed from the mapping, no copy
/// # Ok::<(), ternmux::Error>(())
/// ```
pub struct GgufFile {
    backing: Backing,
    version: u32,
    alignment: u64,
    data_start: u64,
    kv: Vec<(String, RawValue)>,
    kv_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("bytes", &self.backing.bytes().len())
            .field("keys", &self.kv.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses a GGUF file. Costs the metadata only: tensor data is not read.
    ///
    /// Mapping hazard: like every mmap-based loader (llama.cpp, candle, safetensors), this
    /// assumes the file is not truncated or rewritten by another process while it is open —
    /// truncation makes a later access raise SIGBUS. Use [`GgufFile::read`] to load a private
    /// copy instead.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only and private to this process; its contents are treated
        // as untrusted bytes (every read is bounds-checked against the length fixed here). The
        // remaining hazard — another process truncating the file while mapped — is documented
        // above and in the README, as for every mmap-based model loader.
        let map =
            unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
        GgufFile::parse(Backing::Mmap(map)).map_err(|e| match e {
            Error::Gguf(m) => Error::Gguf(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Tells the OS that this process will not read `range` of the file (byte offsets) again
    /// soon: on Unix its pages leave the process's resident set (the page cache keeps them, and a
    /// later read faults them back in from the file). A hint only: nothing happens for a file
    /// read into memory, for a range outside the file, or where the OS refuses.
    pub fn release(&self, range: std::ops::Range<usize>) {
        #[cfg(unix)]
        if let Backing::Mmap(map) = &self.backing
            && range.start < range.end
            && range.end <= map.len()
        {
            // SAFETY: the mapping is private and read-only and this process never writes it, so
            // MADV_DONTNEED only drops the pages from the resident set: a later access reads the
            // same bytes from the file again (the truncation hazard of `open` is unchanged).
            // No reference into the range is invalidated: its contents stay the file's bytes.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    range.start,
                    range.end - range.start,
                )
            };
        }
    }

    /// Reads a whole GGUF file into memory (no mapping) and parses it.
    pub fn read(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        GgufFile::from_bytes(bytes)
    }

    /// Parses GGUF bytes held in memory (tests, fuzzing, network input).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile> {
        GgufFile::parse(Backing::Owned(bytes))
    }

    fn parse(backing: Backing) -> Result<GgufFile> {
        let buf = backing.bytes();
        let header = parse_header(buf)?;
        Ok(GgufFile {
            version: header.version,
            alignment: header.alignment,
            data_start: header.data_start,
            kv_index: header
                .kv
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (k.clone(), i))
                .collect(),
            kv: header.kv,
            tensor_index: header
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            tensors: header.tensors,
            backing,
        })
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Absolute offset of the data section.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }
    /// The whole file's bytes (the mapping).
    pub fn as_bytes(&self) -> &[u8] {
        self.backing.bytes()
    }
    /// Whether the bytes are memory-mapped (as opposed to read into memory).
    pub fn is_mapped(&self) -> bool {
        matches!(self.backing, Backing::Mmap(_))
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, MetaValue<'_>)> + '_ {
        self.kv.iter().map(|(k, v)| (k.as_str(), self.value(v)))
    }
    /// Number of metadata keys.
    pub fn metadata_len(&self) -> usize {
        self.kv.len()
    }
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<MetaValue<'_>> {
        self.kv_index.get(key).map(|&i| self.value(&self.kv[i].1))
    }
    /// The string value of `key` (`None` if absent or not a string).
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }
    /// The value of `key` as an unsigned integer of any width.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.as_u64())
    }
    /// The array value of `key`.
    pub fn get_array(&self, key: &str) -> Option<MetaArray<'_>> {
        self.get(key).and_then(|v| v.as_array())
    }
    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    fn value(&self, raw: &RawValue) -> MetaValue<'_> {
        // Parsing already validated every scalar, string and array extent.
        materialize(self.backing.bytes(), raw, 0).unwrap_or(MetaValue::Bool(false))
    }

    /// The tensor table in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
    /// A tensor's bytes, borrowed from the mapping. Fails for types ternmux cannot compute,
    /// naming the tensor, the id and the dialects it could mean.
    pub fn tensor_data(&self, t: &TensorInfo) -> Result<&[u8]> {
        if let Err(why) = &t.ggml_type {
            return Err(Error::Gguf(format!("tensor {:?}: {why}", t.name)));
        }
        Ok(self.raw_tensor_data(t))
    }
    /// A tensor's byte range whatever its type (for copying unknown tensors verbatim).
    pub fn raw_tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.backing.bytes()[t.range.clone()]
    }
}

fn materialize<'a>(buf: &'a [u8], raw: &RawValue, depth: u32) -> Result<MetaValue<'a>> {
    Ok(match *raw {
        RawValue::Scalar(t, bits) => match t {
            ValueType::U8 => MetaValue::U8(bits as u8),
            ValueType::I8 => MetaValue::I8(bits as u8 as i8),
            ValueType::U16 => MetaValue::U16(bits as u16),
            ValueType::I16 => MetaValue::I16(bits as u16 as i16),
            ValueType::U32 => MetaValue::U32(bits as u32),
            ValueType::I32 => MetaValue::I32(bits as u32 as i32),
            ValueType::F32 => MetaValue::F32(f32::from_bits(bits as u32)),
            ValueType::Bool => MetaValue::Bool(bits != 0),
            ValueType::U64 => MetaValue::U64(bits),
            ValueType::I64 => MetaValue::I64(bits as i64),
            ValueType::F64 => MetaValue::F64(f64::from_bits(bits)),
            ValueType::String | ValueType::Array => unreachable_value(t)?,
        },
        RawValue::Str(ref r) => MetaValue::Str(
            std::str::from_utf8(&buf[r.clone()])
                .map_err(|e| Error::Gguf(format!("string value is not utf-8: {e}")))?,
        ),
        RawValue::Array {
            elem,
            len,
            ref bytes,
        } => MetaValue::Array(MetaArray {
            elem,
            len,
            bytes: &buf[bytes.clone()],
            depth: depth + 1,
        }),
    })
}

fn unreachable_value(t: ValueType) -> Result<MetaValue<'static>> {
    Err(Error::Gguf(format!(
        "internal: scalar slot holds a {}",
        t.name()
    )))
}

/// A bounds-checked little-endian cursor.
#[derive(Clone)]
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    fn take(&mut self, n: u64, what: &str) -> Result<Range<usize>> {
        if n > self.remaining() {
            return Err(Error::Gguf(format!(
                "truncated: {what} needs {n} bytes at offset {}, only {} remain",
                self.pos,
                self.remaining()
            )));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(start..self.pos)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let r = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&self.buf[r]);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A GGUF string's byte range (u64 length + bytes), at most `max` bytes.
    fn string(&mut self, what: &str, max: u64) -> Result<Range<usize>> {
        let len = self.u64(what)?;
        if len > max {
            return Err(Error::Gguf(format!(
                "{what} length {len} exceeds the limit {max}"
            )));
        }
        self.take(len, what)
    }
}

fn read_value(cur: &mut Cursor<'_>, t: ValueType, depth: u32, what: &str) -> Result<RawValue> {
    if let Some(size) = t.fixed_size() {
        let r = cur.take(size, what)?;
        let mut b = [0u8; 8];
        b[..size as usize].copy_from_slice(&cur.buf[r]);
        let bits = u64::from_le_bytes(b);
        if t == ValueType::Bool && bits > 1 {
            return Err(Error::Gguf(format!(
                "{what}: bool value {bits} is not 0 or 1"
            )));
        }
        return Ok(RawValue::Scalar(t, bits));
    }
    match t {
        ValueType::String => {
            let r = cur.string(what, u64::MAX)?;
            std::str::from_utf8(&cur.buf[r.clone()])
                .map_err(|e| Error::Gguf(format!("{what}: string is not utf-8: {e}")))?;
            Ok(RawValue::Str(r))
        }
        _ => {
            if depth >= MAX_NESTING {
                return Err(Error::Gguf(format!(
                    "{what}: arrays nested deeper than {MAX_NESTING}"
                )));
            }
            let et = cur.u32(what)?;
            let elem = ValueType::from_id(et)
                .ok_or_else(|| Error::Gguf(format!("{what}: unknown array element type {et}")))?;
            let len = cur.u64(what)?;
            let start = cur.pos;
            match elem.fixed_size() {
                Some(size) => {
                    let bytes = len.checked_mul(size).ok_or_else(|| {
                        Error::Gguf(format!("{what}: array of {len} {} overflows", elem.name()))
                    })?;
                    cur.take(bytes, what)?;
                    if elem == ValueType::Bool && cur.buf[start..cur.pos].iter().any(|&b| b > 1) {
                        return Err(Error::Gguf(format!(
                            "{what}: bool array holds a value other than 0 or 1"
                        )));
                    }
                }
                None => {
                    // Each string or array element takes at least 8 bytes: reject impossible
                    // counts before walking them.
                    if len > cur.remaining() / 8 {
                        return Err(Error::Gguf(format!(
                            "{what}: array claims {len} {} elements but only {} bytes remain",
                            elem.name(),
                            cur.remaining()
                        )));
                    }
                    for _ in 0..len {
                        read_value(cur, elem, depth + 1, what)?;
                    }
                }
            }
            Ok(RawValue::Array {
                elem,
                len,
                bytes: start..cur.pos,
            })
        }
    }
}

struct Header {
    version: u32,
    alignment: u64,
    data_start: u64,
    kv: Vec<(String, RawValue)>,
    tensors: Vec<TensorInfo>,
}

fn parse_header(buf: &[u8]) -> Result<Header> {
    let mut cur = Cursor::new(buf);
    let magic: [u8; 4] = cur.array("magic")?;
    if magic != MAGIC {
        return Err(Error::Gguf(format!(
            "bad magic {magic:02x?}: not a GGUF file (expected \"GGUF\")"
        )));
    }
    let version = cur.u32("version")?;
    if version & 0xFFFF == 0 && version != 0 {
        return Err(Error::Gguf(format!(
            "version field {version:#010x} looks byte-swapped: big-endian GGUF files are not supported"
        )));
    }
    match version {
        2 | 3 => {}
        1 => {
            return Err(Error::Gguf(
                "version 1 (32-bit counts) is not supported: re-convert the model".into(),
            ));
        }
        v => {
            return Err(Error::Gguf(format!(
                "unsupported version {v} (supported: 2, 3)"
            )));
        }
    }
    let n_tensors = cur.u64("tensor count")?;
    let n_kv = cur.u64("metadata count")?;
    // A key/value takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at least
    // 8 + 4 + 8 + 4 + 8 bytes. Counts beyond what the file can hold are lies: refuse them before
    // allocating anything proportional to them.
    if n_kv > cur.remaining() / 13 {
        return Err(Error::Gguf(format!(
            "metadata count {n_kv} cannot fit in the {} remaining bytes",
            cur.remaining()
        )));
    }
    if n_tensors > cur.remaining() / 32 {
        return Err(Error::Gguf(format!(
            "tensor count {n_tensors} cannot fit in the {} remaining bytes",
            cur.remaining()
        )));
    }
    let mut kv: Vec<(String, RawValue)> = Vec::with_capacity(n_kv as usize);
    let mut seen = std::collections::HashSet::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let kr = cur.string("metadata key", MAX_KEY_LEN)?;
        let key = std::str::from_utf8(&buf[kr.clone()])
            .map_err(|_| {
                Error::Gguf(format!(
                    "metadata key #{i} at offset {} is not utf-8",
                    kr.start
                ))
            })?
            .to_owned();
        let tid = cur.u32("value type")?;
        let t = ValueType::from_id(tid)
            .ok_or_else(|| Error::Gguf(format!("key {key:?}: unknown value type {tid}")))?;
        let v = read_value(&mut cur, t, 0, &key)?;
        if !seen.insert(key.clone()) {
            return Err(Error::Gguf(format!("duplicate metadata key {key:?}")));
        }
        kv.push((key, v));
    }
    let alignment = match kv.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, RawValue::Scalar(ValueType::U32, a))) => {
            if *a == 0 || !a.is_power_of_two() || a % 8 != 0 {
                return Err(Error::Gguf(format!(
                    "general.alignment {a} is not a power of two and a multiple of 8"
                )));
            }
            *a
        }
        Some(_) => return Err(Error::Gguf("general.alignment must be a u32".into())),
    };

    struct Pending {
        name: String,
        dims: [u64; 4],
        n_dims: u32,
        type_id: u32,
        offset: u64,
        elems: u64,
    }
    let mut pending = Vec::with_capacity(n_tensors as usize);
    let mut names = std::collections::HashSet::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let nr = cur.string("tensor name", MAX_TENSOR_NAME_LEN)?;
        let name = std::str::from_utf8(&buf[nr])
            .map_err(|_| Error::Gguf(format!("tensor #{i}: name is not utf-8")))?
            .to_owned();
        let n_dims = cur.u32("tensor dimension count")?;
        if n_dims > MAX_DIMS {
            return Err(Error::Gguf(format!(
                "tensor {name:?}: {n_dims} dimensions exceed the limit {MAX_DIMS}"
            )));
        }
        let mut dims = [1u64; 4];
        // The product of the non-zero dimensions must fit: then every partial product (rows,
        // elements, bytes of any sub-view) fits too, even when a zero dimension makes the total 0.
        let mut nonzero_product: u64 = 1;
        for i in 0..n_dims as usize {
            let d = cur.u64("tensor dimension")?;
            if d > i64::MAX as u64 {
                return Err(Error::Gguf(format!(
                    "tensor {name:?}: dimension {d} is negative as int64"
                )));
            }
            dims[i] = d;
            nonzero_product = nonzero_product.checked_mul(d.max(1)).ok_or_else(|| {
                Error::Gguf(format!(
                    "tensor {name:?}: element count overflows (dims {:?})",
                    &dims[..=i]
                ))
            })?;
        }
        let elems: u64 = dims.iter().product();
        let type_id = cur.u32("tensor type")?;
        let offset = cur.u64("tensor offset")?;
        if offset % alignment != 0 {
            return Err(Error::Gguf(format!(
                "tensor {name:?}: offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(Error::Gguf(format!("duplicate tensor name {name:?}")));
        }
        pending.push(Pending {
            name,
            dims,
            n_dims,
            type_id,
            offset,
            elems,
        });
    }
    let end_of_infos = cur.pos as u64;
    let data_start = end_of_infos.div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    if data_start > file_len && !pending.is_empty() {
        return Err(Error::Gguf(format!(
            "data section starts at {data_start}, past the end of the {file_len}-byte file"
        )));
    }
    let data_len = file_len.saturating_sub(data_start);

    // Each tensor may extend at most to the next tensor's start (in offset order) or the end.
    let mut order: Vec<usize> = (0..pending.len()).collect();
    order.sort_by_key(|&i| pending[i].offset);
    let mut limit = vec![data_len; pending.len()];
    for w in order.windows(2) {
        limit[w[0]] = pending[w[1]].offset;
    }

    let mut tensors = Vec::with_capacity(pending.len());
    for (i, p) in pending.into_iter().enumerate() {
        // Every offset must lie inside the data (checked for each tensor, not only the last in
        // offset order): then `data_start + offset + size` cannot overflow.
        let in_data = p.offset <= data_len;
        let avail = limit[i]
            .min(data_len)
            .checked_sub(p.offset)
            .filter(|_| in_data)
            .ok_or_else(|| {
                Error::Gguf(format!(
                    "tensor {:?}: offset {} is past the end of the data ({data_len} bytes)",
                    p.name, p.offset
                ))
            })?;
        let (ggml_type, size) =
            resolve_type(&p.name, p.type_id, p.dims[0], p.elems, avail, alignment)?;
        if size > avail {
            let what = if limit[i] == data_len {
                "the end of the file".to_string()
            } else {
                "the next tensor".to_string()
            };
            return Err(Error::Gguf(format!(
                "tensor {:?} ({}, dims {:?}) needs {size} bytes at data offset {} but {what} starts {avail} bytes later",
                p.name,
                TypeInfo::of(p.type_id).name,
                &p.dims[..p.n_dims as usize],
                p.offset
            )));
        }
        let start = (data_start + p.offset) as usize;
        tensors.push(TensorInfo {
            name: p.name,
            dims: p.dims,
            n_dims: p.n_dims,
            type_id: p.type_id,
            ggml_type,
            offset: p.offset,
            range: start..start + size as usize,
        });
    }
    Ok(Header {
        version,
        alignment,
        data_start,
        kv,
        tensors,
    })
}

/// Decides a tensor's type and size. Returns the computable type (or why not) and the byte size to
/// reserve; errors for shapes no dialect allows.
fn resolve_type(
    name: &str,
    id: u32,
    ne0: u64,
    elems: u64,
    avail: u64,
    alignment: u64,
) -> Result<(std::result::Result<GgmlType, String>, u64)> {
    let info = TypeInfo::of(id);
    let shape_err = |what: &str| {
        Error::Gguf(format!(
            "tensor {name:?}: row length {ne0} does not fit {} ({what})",
            info.name
        ))
    };
    match id {
        ids::I2_S => {
            // bitnet.cpp I2_S: n/4 packed bytes + 32-byte tail. Upstream: the removed
            // IQ4_NL_4_4 (18 bytes per 32). Decide by the byte range the file gives the tensor.
            let i2s = if ne0.is_multiple_of(128) {
                Some(elems / 4 + 32)
            } else {
                None
            };
            let iq4 = if ne0.is_multiple_of(32) {
                elems.checked_mul(18).map(|b| b / 32)
            } else {
                None
            };
            let fits = |s: Option<u64>| s.is_some_and(|s| s <= avail && avail - s < alignment + 32);
            if fits(i2s) && !(fits(iq4) && iq4 != i2s) {
                return Ok((Ok(GgmlType::Ternary(TernaryFormat::I2S)), i2s.unwrap_or(0)));
            }
            let why = format!(
                "type 36 is I2_S in bitnet.cpp ({} bytes for this shape) and the removed IQ4_NL_4_4 in \
                 upstream llama.cpp ({} bytes); the file gives this tensor {avail} bytes, which {}",
                i2s.map_or("impossible".to_string(), |s| s.to_string()),
                iq4.map_or("impossible".to_string(), |s| s.to_string()),
                if fits(iq4) {
                    "matches IQ4_NL_4_4 (not supported: re-quantize the model)"
                } else {
                    "matches neither"
                }
            );
            if fits(iq4) {
                return Ok((Err(why), iq4.unwrap_or(0)));
            }
            Err(Error::Gguf(format!("tensor {name:?}: {why}")))
        }
        ids::MXFP4_OR_TL2 | ids::I8_S | ids::TL1 => {
            let why = format!(
                "type {id} is {} — a layout ternmux does not compute; convert the ternary weights to \
                 I2_S, TQ1_0 or TQ2_0",
                info.name
            );
            Ok((Err(why), avail))
        }
        _ => match info.supported {
            Some(t) => {
                let size = t
                    .tensor_bytes(ne0, elems)
                    .ok_or_else(|| shape_err("block size"))?;
                Ok((Ok(t), size))
            }
            None if info.block_elems > 0 => {
                if !ne0.is_multiple_of(info.block_elems) {
                    return Err(shape_err("block size"));
                }
                let size = (elems / info.block_elems)
                    .checked_mul(info.block_bytes)
                    .ok_or_else(|| shape_err("size overflows"))?;
                Ok((
                    Err(format!(
                        "type {} ({id}) is not supported by ternmux",
                        info.name
                    )),
                    size,
                ))
            }
            None => Ok((
                Err(format!(
                    "unknown type id {id} (not in upstream llama.cpp, bitnet.cpp or ik_llama.cpp as known to ternmux)"
                )),
                avail,
            )),
        },
    }
}
