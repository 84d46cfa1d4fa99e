//! Fuzz the GGUF reader: any bytes must parse to a file or a typed error, and everything
//! reachable from an accepted file (metadata arrays, tensor data, decoding, the inspect report)
//! must be safe to walk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::fmt::Write as _;
use ternmux::gguf::{GgmlType, GgufFile, Report};

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else { return };
    for (_, v) in f.metadata() {
        if let Some(a) = v.as_array() {
            for e in a.iter().take(1 << 16) {
                if let Ok(inner) = e {
                    if let Some(b) = inner.as_array() {
                        for x in b.iter().take(1 << 12) {
                            let _ = x;
                        }
                    }
                }
            }
        }
    }
    for t in f.tensors() {
        if let (Ok(ty), Ok(bytes)) = (t.ggml_type(), f.tensor_data(t)) {
            let (rows, cols) = t.rows_cols();
            if rows.saturating_mul(cols) <= 1 << 16 {
                let _ = ternmux::quant::decode(ty, bytes, rows, cols);
                if let GgmlType::Ternary(fmt) = ty {
                    let _ = ternmux::quant::ternary_codes_valid(fmt, bytes, rows, cols);
                }
            }
        }
    }
    let mut s = String::new();
    let _ = write!(s, "{}", Report::new(&f, "fuzz"));
});
