//! Run one real ternary layer of the bundled model on every ISA this CPU has.
//!
//! `cargo run --release --example ternary_layer [MODEL.gguf [TENSOR]]`
//!
//! Opens the GGUF (zero copy), wraps a ternary weight tensor without copying it, quantizes an
//! activation vector per token (the BitNet training arithmetic), multiplies on each ISA, and
//! checks that all ISAs agree bit for bit.

use std::time::Instant;
use ternmux::gguf::{GgmlType, GgufFile};
use ternmux::kernels::Kernels;
use ternmux::kernels::act::{ActQuant, QuantizedActs};
use ternmux::kernels::ternary::TernaryMatrix;

fn main() -> Result<(), ternmux::Error> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| "models/bitllama2c-stories3M-TQ2_0.gguf".into());
    let name = args.next().unwrap_or_else(|| "blk.0.ffn_up.weight".into());
    let file = GgufFile::open(&path)?;
    let info = file
        .tensor(&name)
        .ok_or_else(|| ternmux::Error::Gguf(format!("no tensor {name:?} in {path}")))?;
    let GgmlType::Ternary(format) = info.ggml_type()? else {
        return Err(ternmux::Error::Gguf(format!(
            "{name} is {}, not ternary",
            info.type_name()
        )));
    };
    let (rows, cols) = info.rows_cols();
    let w = TernaryMatrix::new(format, file.tensor_data(info)?, rows, cols)?;
    let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.1).sin()).collect();
    let mut acts = QuantizedActs::new(ActQuant::PerToken);
    acts.quantize(&x, cols)?;
    println!(
        "{name}: {} {rows} x {cols}, {} bytes borrowed from the mapping",
        format.name(),
        w.data().len()
    );
    let mut first: Option<Vec<f32>> = None;
    for kern in Kernels::available() {
        let mut out = vec![0f32; rows];
        kern.ternary_matmul(&w, &acts, &mut out)?;
        let reps = 200;
        let t = Instant::now();
        for _ in 0..reps {
            kern.ternary_matmul(&w, &acts, &mut out)?;
        }
        let per = t.elapsed() / reps;
        let same = first.as_ref().map_or("reference".to_string(), |f| {
            if f.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()) {
                "bit-identical".into()
            } else {
                "DIFFERENT".into()
            }
        });
        println!(
            "  {:<13} {per:>10.2?} per product  out[0..4] = {:?}  ({same})",
            kern.isa().name(),
            &out[..4]
        );
        first.get_or_insert(out);
    }
    Ok(())
}
