//! GGUF v3 writer, used by the converter, the synthetic-model generator and the tests.
//!
//! Tensor data may be borrowed (a tensor copied from a mapped file is never duplicated in memory)
//! or owned. Offsets are assigned in insertion order, each padded to the alignment, exactly as
//! llama.cpp's and gguf-py's writers do; the file is written in one sequential pass.

use super::reader::{MetaArray, MetaValue, ValueType};
use crate::error::{Error, Result};
use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

/// An owned metadata value for writing.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
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
    /// string
    Str(String),
    /// array of values of one type (`elem` names it, so empty arrays keep their type)
    Array(ValueType, Vec<Value>),
    /// u64
    U64(u64),
    /// i64
    I64(i64),
    /// f64
    F64(f64),
}

impl Value {
    /// The value's type id.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::Str(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// An array of strings.
    pub fn strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Value {
        Value::Array(
            ValueType::String,
            items.into_iter().map(|s| Value::Str(s.into())).collect(),
        )
    }

    /// Copies a value read from a file.
    pub fn from_meta(v: &MetaValue<'_>) -> Result<Value> {
        Ok(match *v {
            MetaValue::U8(x) => Value::U8(x),
            MetaValue::I8(x) => Value::I8(x),
            MetaValue::U16(x) => Value::U16(x),
            MetaValue::I16(x) => Value::I16(x),
            MetaValue::U32(x) => Value::U32(x),
            MetaValue::I32(x) => Value::I32(x),
            MetaValue::F32(x) => Value::F32(x),
            MetaValue::Bool(x) => Value::Bool(x),
            MetaValue::Str(s) => Value::Str(s.to_owned()),
            MetaValue::U64(x) => Value::U64(x),
            MetaValue::I64(x) => Value::I64(x),
            MetaValue::F64(x) => Value::F64(x),
            MetaValue::Array(a) => Value::from_meta_array(&a)?,
        })
    }

    fn from_meta_array(a: &MetaArray<'_>) -> Result<Value> {
        let items = a
            .iter()
            .map(|v| Value::from_meta(&v?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Value::Array(a.elem_type(), items))
    }

    fn write(&self, out: &mut Vec<u8>) -> Result<()> {
        match self {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(u8::from(*x)),
            Value::Str(s) => write_str(out, s),
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Array(elem, items) => {
                out.extend_from_slice(&(*elem as u32).to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    if item.value_type() != *elem {
                        return Err(Error::Gguf(format!(
                            "array of {} holds a {}",
                            elem.name(),
                            item.value_type().name()
                        )));
                    }
                    item.write(out)?;
                }
            }
        }
        Ok(())
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct PendingTensor<'a> {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    data: Cow<'a, [u8]>,
}

/// Builds a GGUF v3 file.
///
/// ```
/// use ternmux::gguf::{GgufFile, GgufWriter, Value};
/// let mut w = GgufWriter::new();
/// w.add_kv("general.architecture", Value::Str("llama".into()));
/// w.add_tensor("x", &[4], 0, 16u32.to_le_bytes().repeat(4))?; // four f32
/// let bytes = w.to_bytes()?;
/// let f = GgufFile::from_bytes(bytes)?;
/// assert_eq!(f.architecture(), Some("llama"));
/// assert_eq!(f.tensor("x").unwrap().dims(), &[4]);
/// # Ok::<(), ternmux::Error>(())
/// ```
pub struct GgufWriter<'a> {
    alignment: u64,
    kv: Vec<(String, Value)>,
    tensors: Vec<PendingTensor<'a>>,
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> GgufWriter<'a> {
    /// An empty file with the default alignment (32).
    pub fn new() -> Self {
        GgufWriter {
            alignment: 32,
            kv: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Sets `general.alignment` (a power of two, multiple of 8).
    pub fn set_alignment(&mut self, alignment: u32) -> Result<()> {
        if alignment == 0 || !alignment.is_power_of_two() || !alignment.is_multiple_of(8) {
            return Err(Error::Gguf(format!(
                "alignment {alignment} is not a power of two and a multiple of 8"
            )));
        }
        self.alignment = u64::from(alignment);
        self.add_kv("general.alignment", Value::U32(alignment));
        Ok(())
    }

    /// Adds or replaces a metadata key (insertion order is kept).
    pub fn add_kv(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        match self.kv.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.kv.push((key, value)),
        }
    }

    /// Metadata added so far.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.kv
    }

    /// Adds a tensor: `dims` innermost first, `type_id` a ggml type id, `data` its bytes.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        type_id: u32,
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Result<()> {
        let name = name.into();
        if dims.is_empty() || dims.len() > 4 {
            return Err(Error::Gguf(format!(
                "tensor {name:?}: {} dimensions (1 to 4 allowed)",
                dims.len()
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(Error::Gguf(format!("duplicate tensor name {name:?}")));
        }
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            type_id,
            data: data.into(),
        });
        Ok(())
    }

    fn header(&self) -> Result<Vec<u8>> {
        let mut h = Vec::new();
        h.extend_from_slice(b"GGUF");
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            write_str(&mut h, k);
            h.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            v.write(&mut h)?;
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            write_str(&mut h, &t.name);
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.type_id.to_le_bytes());
            h.extend_from_slice(&offset.to_le_bytes());
            offset += (t.data.len() as u64).div_ceil(self.alignment) * self.alignment;
        }
        let pad = (h.len() as u64).div_ceil(self.alignment) * self.alignment - h.len() as u64;
        h.resize(h.len() + pad as usize, 0);
        Ok(h)
    }

    /// Writes the file to `out` in one pass.
    pub fn write_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        let header = self
            .header()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        out.write_all(&header)?;
        let zeros = vec![0u8; self.alignment as usize];
        for t in &self.tensors {
            out.write_all(&t.data)?;
            let pad = (t.data.len() as u64).div_ceil(self.alignment) * self.alignment
                - t.data.len() as u64;
            out.write_all(&zeros[..pad as usize])?;
        }
        Ok(())
    }

    /// The whole file as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.write_to(&mut v)
            .map_err(|e| Error::Gguf(format!("writing to memory: {e}")))?;
        Ok(v)
    }

    /// Writes the file to `path` (through a temporary file renamed into place).
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let tmp = path.with_extension("gguf.partial");
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        self.write_to(&mut out)
            .and_then(|_| out.flush())
            .map_err(|e| Error::io(&tmp, e))?;
        drop(out);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }
}
