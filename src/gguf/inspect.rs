//! The human-readable report of `ternmux inspect`.

use super::{GgufFile, MetaValue, ValueType};
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

/// How many elements of an array the report shows before summarizing.
const ARRAY_PREVIEW: usize = 5;

/// A printable summary: header, metadata (arrays summarized), tensor table and totals per type.
pub struct Report<'a> {
    file: &'a GgufFile,
    name: String,
}

impl<'a> Report<'a> {
    /// A report on `file`, headed with `name` (usually its path).
    pub fn new(file: &'a GgufFile, name: impl Into<String>) -> Self {
        Report {
            file,
            name: name.into(),
        }
    }
}

fn preview(v: &MetaValue<'_>) -> String {
    let Some(a) = v.as_array() else {
        return truncate(&v.to_string(), 120);
    };
    let mut s = format!("[{} x {}]", a.len(), a.elem_type().name());
    if a.elem_type() == ValueType::Array {
        return s;
    }
    let items: Vec<String> = a
        .iter()
        .take(ARRAY_PREVIEW)
        .map(|e| {
            e.map(|e| truncate(&e.to_string(), 24))
                .unwrap_or_else(|err| format!("<{err}>"))
        })
        .collect();
    let _ = write!(s, " {}", items.join(", "));
    if a.len() > ARRAY_PREVIEW {
        s.push_str(", ...");
    }
    s
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max).collect();
    t.push('…');
    t
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.file;
        writeln!(
            f,
            "{}: GGUF v{}, {} bytes, alignment {}, data at offset {}{}",
            self.name,
            g.version(),
            g.as_bytes().len(),
            g.alignment(),
            g.data_start(),
            if g.is_mapped() {
                " (memory-mapped)"
            } else {
                ""
            }
        )?;
        writeln!(f, "architecture: {}", g.architecture().unwrap_or("(none)"))?;
        writeln!(f, "\nmetadata ({} keys):", g.metadata_len())?;
        for (k, v) in g.metadata() {
            writeln!(f, "  {k:<42} {:<7} {}", v.value_type().name(), preview(&v))?;
        }
        writeln!(f, "\ntensors ({}):", g.tensors().len())?;
        let w = g
            .tensors()
            .iter()
            .map(|t| t.name().len())
            .max()
            .unwrap_or(4)
            .max(4);
        writeln!(
            f,
            "  {:<w$}  {:<8} {:<22} {:>12} {:>12}",
            "name", "type", "shape", "bytes", "offset"
        )?;
        let mut totals: BTreeMap<&str, (usize, u64, u64)> = BTreeMap::new();
        for t in g.tensors() {
            let shape = format!("{:?}", t.dims());
            writeln!(
                f,
                "  {:<w$}  {:<8} {:<22} {:>12} {:>12}",
                t.name(),
                t.type_name(),
                shape,
                t.size(),
                t.offset()
            )?;
            let e = totals.entry(t.type_name()).or_default();
            e.0 += 1;
            e.1 += t.size() as u64;
            e.2 += t.elements();
        }
        writeln!(f, "\ntotals by type:")?;
        let (mut n, mut b, mut el) = (0usize, 0u64, 0u64);
        for (ty, (count, bytes, elems)) in &totals {
            let bpw = if *elems > 0 {
                *bytes as f64 * 8.0 / *elems as f64
            } else {
                0.0
            };
            writeln!(
                f,
                "  {ty:<8} {count:>5} tensors {bytes:>14} bytes {elems:>14} elements {bpw:>7.3} bits/weight"
            )?;
            n += count;
            b += bytes;
            el += elems;
        }
        writeln!(
            f,
            "  {:<8} {n:>5} tensors {b:>14} bytes {el:>14} elements",
            "all"
        )
    }
}
