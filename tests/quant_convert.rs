//! Encoding, decoding and exact conversion between the ternary formats.

use proptest::prelude::*;
use ternmux::gguf::{GgmlType, GgufFile};
use ternmux::kernels::ternary::TernaryFormat::{self, I2S, Tq1_0, Tq2_0};
use ternmux::quant::{convert_ternary, decode, encode, ternary_codes_valid};

fn model(name: &str) -> String {
    format!("{}/models/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Ternary values with one scale per tensor (what ternary-trained models hold).
fn ternary_tensor(rows: usize, cols: usize) -> impl Strategy<Value = (Vec<f32>, f32)> {
    (prop::collection::vec(0u8..3, rows * cols), 1e-3f32..4.0).prop_map(|(codes, s)| {
        // Keep the scale exactly representable in f16 so every path is exact.
        let s = half::f16::from_f32(s).to_f32();
        (codes.iter().map(|&c| (f32::from(c) - 1.0) * s).collect(), s)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every ternary encoder reproduces ternary input exactly, and every conversion path between
    /// the three formats preserves every value.
    #[test]
    fn ternary_formats_round_trip_exactly(
        (rows, cols, x) in (1usize..5, 1usize..4).prop_flat_map(|(rows, blocks)| {
            ternary_tensor(rows, blocks * 256).prop_map(move |(x, _)| (rows, blocks * 256, x))
        })
    ) {
        for from in TernaryFormat::ALL {
            let bytes = encode(GgmlType::Ternary(from), &x, rows, cols).unwrap();
            prop_assert_eq!(&decode(GgmlType::Ternary(from), &bytes, rows, cols).unwrap(), &x);
            for to in TernaryFormat::ALL {
                let conv = convert_ternary(from, &bytes, rows, cols, to).unwrap();
                prop_assert_eq!(&decode(GgmlType::Ternary(to), &conv, rows, cols).unwrap(), &x, "{:?} -> {:?}", from, to);
            }
        }
    }

    /// TQ encoders on arbitrary floats follow the reference rule: d = absmax per block, and each
    /// value decodes to the nearest of {-d, 0, d} (ties away from zero).
    #[test]
    fn tq_encoders_follow_the_reference_rule(x in prop::collection::vec(-3.0f32..3.0, 512)) {
        for f in [Tq2_0, Tq1_0] {
            let y = decode(GgmlType::Ternary(f), &encode(GgmlType::Ternary(f), &x, 2, 256).unwrap(), 2, 256).unwrap();
            for b in 0..2 {
                let xb = &x[b * 256..(b + 1) * 256];
                let d = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let dh = half::f16::from_f32(d).to_f32();
                for (j, &v) in xb.iter().enumerate() {
                    let code = (v * (1.0 / d)).round();
                    prop_assert_eq!(y[b * 256 + j], code * dh);
                }
            }
        }
    }
}

#[test]
fn i2s_with_odd_block_count_converts_only_where_it_can() {
    let (rows, cols) = (3, 384); // 3 groups of 128: fine for I2_S, not for TQ (needs 256)
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| [1.0f32, 0.0, -1.0][i % 3])
        .collect();
    let bytes = encode(GgmlType::Ternary(I2S), &x, rows, cols).unwrap();
    let e = convert_ternary(I2S, &bytes, rows, cols, Tq2_0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("384") && e.contains("256"), "{e}");
}

#[test]
fn tq_to_i2s_refuses_differing_block_scales() {
    let mut x = vec![0.5f32; 512];
    x[300] = 0.75; // second block has absmax 0.75, first 0.5
    let bytes = encode(GgmlType::Ternary(Tq2_0), &x, 1, 512).unwrap();
    let e = convert_ternary(Tq2_0, &bytes, 1, 512, I2S)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("block scales range from 0.5 to 0.75") && e.contains("one scale per tensor"),
        "{e}"
    );
}

#[test]
fn code_3_is_detected_and_refused() {
    let mut bytes = encode(GgmlType::Ternary(Tq2_0), &vec![0.0f32; 256], 1, 256).unwrap();
    bytes[10] |= 0b11 << 4; // element 128*0 + 32*2 + 10 = 74
    let e = ternary_codes_valid(Tq2_0, &bytes, 1, 256)
        .unwrap_err()
        .to_string();
    assert!(e.contains("column 74") && e.contains("code 3"), "{e}");
    assert!(convert_ternary(Tq2_0, &bytes, 1, 256, Tq1_0).is_err());
}

#[test]
fn bundled_model_converts_through_every_format_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let src = model("bitllama2c-stories3M-TQ2_0.gguf");
    let i2s = dir.path().join("i2s.gguf");
    let tq1 = dir.path().join("tq1.gguf");
    let r = ternmux::convert::convert_file(src.as_ref(), &i2s, I2S).unwrap();
    assert_eq!((r.converted, r.copied), (56, 34));
    ternmux::convert::convert_file(&i2s, &tq1, Tq1_0).unwrap();
    let ours = GgufFile::open(&tq1).unwrap();
    let shipped = GgufFile::open(model("bitllama2c-stories3M-TQ1_0.gguf")).unwrap();
    let orig = GgufFile::open(&src).unwrap();
    assert_eq!(ours.metadata_len(), orig.metadata_len()); // file_type dropped, alignment added
    for t in shipped.tensors() {
        let o = ours.tensor(t.name()).unwrap();
        assert_eq!(o.dims(), t.dims());
        let (rows, cols) = t.rows_cols();
        let a = decode(
            t.ggml_type().unwrap(),
            shipped.tensor_data(t).unwrap(),
            rows,
            cols,
        )
        .unwrap();
        let b = decode(
            o.ggml_type().unwrap(),
            ours.tensor_data(o).unwrap(),
            rows,
            cols,
        )
        .unwrap();
        assert_eq!(a, b, "{}", t.name());
    }
    let conv = GgufFile::open(&i2s).unwrap();
    assert_eq!(
        conv.tensors()
            .iter()
            .filter(|t| t.type_name() == "I2_S")
            .count(),
        56
    );
}
