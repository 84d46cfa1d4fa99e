//! The GGUF reader and writer: fixtures written by PyPI `gguf` 0.19 (scripts/make_fixtures.py),
//! round trips through our writer, zero copy, and hostile input.

use ternmux::gguf::{GgmlType, GgufFile, GgufWriter, MetaValue, Value, ValueType, ids};
use ternmux::kernels::dequant::FloatFormat;
use ternmux::kernels::ternary::TernaryFormat;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn model(name: &str) -> String {
    format!("{}/models/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn every_type_decodes_like_gguf_py() {
    let f = GgufFile::open(fixture("quant_types.gguf")).unwrap();
    let mut checked = Vec::new();
    for t in f.tensors().iter().filter(|t| t.name().ends_with(".q")) {
        let ty = t.ggml_type().unwrap();
        let (rows, cols) = t.rows_cols();
        let got = ternmux::quant::decode(ty, f.tensor_data(t).unwrap(), rows, cols).unwrap();
        let expect_name = t.name().replace(".q", ".expect");
        let expect = f32s(f.tensor_data(f.tensor(&expect_name).unwrap()).unwrap());
        assert_eq!(got.len(), expect.len());
        for (i, (a, b)) in got.iter().zip(&expect).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{}: element {i}: ours {a} gguf-py {b}",
                t.name()
            );
        }
        checked.push(ty.name());
    }
    checked.sort();
    assert_eq!(
        checked,
        [
            "BF16", "F16", "F32", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "TQ1_0", "TQ2_0"
        ]
    );
}

#[test]
fn encoders_write_the_same_bytes_as_gguf_py() {
    let f = GgufFile::open(fixture("quant_types.gguf")).unwrap();
    for name in ["F16", "BF16", "Q8_0", "TQ1_0", "TQ2_0"] {
        let q = f.tensor(&format!("{name}.q")).unwrap();
        let src = f32s(
            f.tensor_data(f.tensor(&format!("{name}.source")).unwrap())
                .unwrap(),
        );
        let (rows, cols) = q.rows_cols();
        let ours = ternmux::quant::encode(q.ggml_type().unwrap(), &src, rows, cols).unwrap();
        assert_eq!(
            ours,
            f.tensor_data(q).unwrap(),
            "{name}: encoded bytes differ from gguf-py's"
        );
    }
}

#[test]
fn metadata_of_every_type_v3_and_v2() {
    for (file, version) in [("metadata_v3.gguf", 3), ("metadata_v2.gguf", 2)] {
        let f = GgufFile::open(fixture(file)).unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.get("t.u8"), Some(MetaValue::U8(200)));
        assert_eq!(f.get("t.i8"), Some(MetaValue::I8(-100)));
        assert_eq!(f.get("t.u16"), Some(MetaValue::U16(60000)));
        assert_eq!(f.get("t.i16"), Some(MetaValue::I16(-30000)));
        assert_eq!(f.get("t.u32"), Some(MetaValue::U32(4_000_000_000)));
        assert_eq!(f.get("t.i32"), Some(MetaValue::I32(-2_000_000_000)));
        assert_eq!(f.get("t.f32"), Some(MetaValue::F32(1.5)));
        assert_eq!(f.get("t.bool"), Some(MetaValue::Bool(true)));
        assert_eq!(f.get_str("t.str"), Some("héllo ✓ wörld"));
        assert_eq!(f.get("t.u64"), Some(MetaValue::U64((1 << 63) + 5)));
        assert_eq!(f.get("t.i64"), Some(MetaValue::I64(-(1 << 62))));
        assert_eq!(f.get("t.f64"), Some(MetaValue::F64(-2.25)));
        let i16s: Vec<_> = f
            .get_array("t.arr_i16")
            .unwrap()
            .iter()
            .map(|v| v.unwrap())
            .collect();
        assert_eq!(
            i16s,
            [MetaValue::I16(-1), MetaValue::I16(2), MetaValue::I16(-3)]
        );
        let strs: Vec<_> = f
            .get_array("t.arr_str")
            .unwrap()
            .strings()
            .map(|s| s.unwrap())
            .collect();
        assert_eq!(strs, ["a", "", "ünïcode", "<0x0A>"]);
        let bools: Vec<_> = f
            .get_array("t.arr_bool")
            .unwrap()
            .iter()
            .map(|v| v.unwrap().as_bool().unwrap())
            .collect();
        assert_eq!(bools, [true, false, true]);
        // Arrays of arrays, decoded lazily.
        let outer = f.get_array("t.arr_arr").unwrap();
        assert_eq!(outer.elem_type(), ValueType::Array);
        let inner: Vec<Vec<u64>> = outer
            .iter()
            .map(|a| {
                a.unwrap()
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.unwrap().as_u64().unwrap())
                    .collect()
            })
            .collect();
        assert_eq!(inner, vec![vec![1, 2], vec![3], vec![4, 5, 6]]);
        let nested: Vec<Vec<String>> = f
            .get_array("t.arr_arr_str")
            .unwrap()
            .iter()
            .map(|a| {
                a.unwrap()
                    .as_array()
                    .unwrap()
                    .strings()
                    .map(|s| s.unwrap().to_string())
                    .collect()
            })
            .collect();
        assert_eq!(
            nested,
            vec![vec!["x".to_string(), "yy".into()], vec!["zzz".into()]]
        );
        // Tensors: shapes innermost first, data in place, aligned to 64.
        let a = f.tensor("a").unwrap();
        assert_eq!(a.dims(), &[16, 4]);
        assert_eq!(
            f32s(f.tensor_data(a).unwrap()),
            (0..64).map(|i| i as f32).collect::<Vec<_>>()
        );
        let c = f.tensor("c").unwrap();
        assert_eq!(c.dims(), &[32, 4, 3, 2]);
        assert_eq!(c.ggml_type().unwrap(), GgmlType::Float(FloatFormat::F16));
        for t in f.tensors() {
            assert_eq!(t.offset() % 64, 0);
        }
    }
}

#[test]
fn tensor_data_is_borrowed_from_the_mapping() {
    let f = GgufFile::open(model("bitllama2c-stories3M-TQ2_0.gguf")).unwrap();
    assert!(f.is_mapped());
    let whole = f.as_bytes().as_ptr_range();
    assert_eq!(f.tensors().len(), 90);
    for t in f.tensors() {
        let d = f.tensor_data(t).unwrap();
        let r = d.as_ptr_range();
        assert!(
            whole.start <= r.start && r.end <= whole.end,
            "{} not inside the mapping",
            t.name()
        );
        assert_eq!(
            d.as_ptr() as usize - whole.start as usize,
            t.file_range().start
        );
    }
    let n_ternary = f
        .tensors()
        .iter()
        .filter(|t| t.type_name() == "TQ2_0")
        .count();
    assert_eq!(n_ternary, 56);
}

#[test]
fn writer_round_trips_every_value_type_and_tensors() {
    let mut w = GgufWriter::new();
    w.set_alignment(128).unwrap();
    let values = vec![
        ("u8", Value::U8(7)),
        ("i8", Value::I8(-7)),
        ("u16", Value::U16(65535)),
        ("i16", Value::I16(-32768)),
        ("u32", Value::U32(u32::MAX)),
        ("i32", Value::I32(i32::MIN)),
        ("f32", Value::F32(-0.0)),
        ("bool", Value::Bool(false)),
        ("str", Value::Str("ü".into())),
        ("u64", Value::U64(u64::MAX)),
        ("i64", Value::I64(i64::MIN)),
        ("f64", Value::F64(f64::MAX)),
        ("empty", Value::Array(ValueType::U32, vec![])),
        ("strs", Value::strings(["a", "bb"])),
        (
            "nested",
            Value::Array(
                ValueType::Array,
                vec![
                    Value::strings(["x"]),
                    Value::Array(
                        ValueType::Array,
                        vec![Value::Array(ValueType::F64, vec![Value::F64(1.0)])],
                    ),
                ],
            ),
        ),
    ];
    for (k, v) in &values {
        w.add_kv(*k, v.clone());
    }
    let blob: Vec<u8> = (0..1000u32)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    w.add_tensor("t0", &[1000], ids::F32, &blob[..]).unwrap();
    w.add_tensor("t1", &[10, 100], ids::F32, blob.clone())
        .unwrap();
    assert!(
        w.add_tensor("t1", &[1], ids::F32, vec![0u8; 4]).is_err(),
        "duplicate tensor names are refused"
    );
    let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
    assert_eq!(f.alignment(), 128);
    for (k, v) in &values {
        let back = Value::from_meta(&f.get(k).unwrap()).unwrap();
        assert_eq!(&back, v, "{k}");
    }
    assert_eq!(f.tensor_data(f.tensor("t0").unwrap()).unwrap(), &blob[..]);
    assert_eq!(f.tensor("t1").unwrap().offset() % 128, 0);
    assert_eq!(f.tensor_data(f.tensor("t1").unwrap()).unwrap(), &blob[..]);
}

#[test]
fn i2s_is_recognised_by_its_byte_range() {
    let (rows, cols) = (4usize, 384usize);
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| [0.25f32, 0.0, -0.25][i * 7 % 3])
        .collect();
    let bytes =
        ternmux::quant::encode(GgmlType::Ternary(TernaryFormat::I2S), &x, rows, cols).unwrap();
    assert_eq!(bytes.len(), rows * cols / 4 + 32);
    let mut w = GgufWriter::new();
    w.add_tensor("w", &[cols as u64, rows as u64], ids::I2_S, bytes.clone())
        .unwrap();
    w.add_tensor("after", &[8], ids::F32, vec![0u8; 32])
        .unwrap();
    let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
    let t = f.tensor("w").unwrap();
    assert_eq!(
        t.ggml_type().unwrap(),
        GgmlType::Ternary(TernaryFormat::I2S)
    );
    assert_eq!(f.tensor_data(t).unwrap(), &bytes[..]);
    assert_eq!(
        ternmux::quant::decode(t.ggml_type().unwrap(), &bytes, rows, cols).unwrap(),
        x
    );
}

#[test]
fn dialect_clashes_name_the_tensor_id_and_dialects() {
    // Type 36 whose range matches upstream's removed IQ4_NL_4_4 (18 bytes per 32), not I2_S.
    let cols = 1024u64;
    let mut w = GgufWriter::new();
    w.add_tensor(
        "blk.0.attn_q.weight",
        &[cols, 1],
        ids::I2_S,
        vec![0u8; (cols / 32 * 18) as usize],
    )
    .unwrap();
    let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
    let t = f.tensor("blk.0.attn_q.weight").unwrap();
    let e = f.tensor_data(t).unwrap_err().to_string();
    for needle in [
        "blk.0.attn_q.weight",
        "type 36",
        "I2_S",
        "bitnet.cpp",
        "IQ4_NL_4_4",
    ] {
        assert!(e.contains(needle), "{needle:?} missing from: {e}");
    }
    // Type 39: MXFP4 upstream, TL2 in bitnet.cpp; neither is computed.
    let mut w = GgufWriter::new();
    w.add_tensor(
        "blk.0.ffn_up.weight",
        &[256, 2],
        ids::MXFP4_OR_TL2,
        vec![0u8; 2 * 8 * 17],
    )
    .unwrap();
    let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
    let e = f
        .tensor_data(f.tensor("blk.0.ffn_up.weight").unwrap())
        .unwrap_err()
        .to_string();
    for needle in ["blk.0.ffn_up.weight", "39", "MXFP4", "TL2"] {
        assert!(e.contains(needle), "{needle:?} missing from: {e}");
    }
    // A range that fits neither meaning of 36 fails at open.
    let mut w = GgufWriter::new();
    w.add_tensor("x", &[1024, 1], ids::I2_S, vec![0u8; 100])
        .unwrap();
    let e = GgufFile::from_bytes(w.to_bytes().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("matches neither") && e.contains("\"x\""), "{e}");
    // Unknown ids open (inspect can show them) and fail on use.
    let mut w = GgufWriter::new();
    w.add_tensor("u", &[4], 77, vec![0u8; 32]).unwrap();
    let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
    let e = f
        .tensor_data(f.tensor("u").unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown type id 77") && e.contains("\"u\""),
        "{e}"
    );
}

/// Builds raw GGUF bytes by hand, so tests can write what no writer would.
#[derive(Default)]
struct Raw(Vec<u8>);
impl Raw {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut r = Raw(b"GGUF".to_vec());
        r.u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, s: &[u8]) -> &mut Self {
        self.u64(s.len() as u64).bytes(s)
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.str(k.as_bytes()).u32(4).u32(v)
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name.as_bytes()).u32(dims.len() as u32);
        for d in dims {
            self.u64(*d);
        }
        self.u32(ty).u64(offset)
    }
    fn pad_to(&mut self, align: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self
    }
    fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    fn err(&self) -> String {
        match GgufFile::from_bytes(self.0.clone()) {
            Ok(_) => panic!("malformed input was accepted"),
            Err(e) => e.to_string(),
        }
    }
}

fn expect_err(raw: &Raw, needles: &[&str]) {
    let e = raw.err();
    assert!(e.starts_with("gguf: "), "{e}");
    for n in needles {
        assert!(e.contains(n), "{n:?} not in {e:?}");
    }
}

#[test]
fn malformed_headers_give_typed_errors() {
    expect_err(Raw(b"GGUX\x03\0\0\0".to_vec()).pad_to(1), &["bad magic"]);
    expect_err(&Raw::header(1, 0, 0), &["version 1"]);
    expect_err(
        &Raw::header(3u32.swap_bytes(), 0, 0),
        &["byte-swapped", "big-endian"],
    );
    expect_err(&Raw::header(4, 0, 0), &["unsupported version 4"]);
    expect_err(
        &Raw::header(3, u64::MAX, 0),
        &["tensor count", "cannot fit"],
    );
    expect_err(
        &Raw::header(3, 0, 1 << 40),
        &["metadata count", "cannot fit"],
    );
    // A string claiming 2^63 bytes.
    expect_err(
        Raw::header(3, 0, 1).u64(1 << 63).bytes(b"k").zeros(16),
        &["metadata key", "exceeds the limit"],
    );
    // An array claiming u64::MAX u32 elements: refused before any allocation.
    expect_err(
        Raw::header(3, 0, 1).str(b"k").u32(9).u32(4).u64(u64::MAX),
        &["overflows"],
    );
    expect_err(
        Raw::header(3, 0, 1).str(b"k").u32(9).u32(8).u64(1 << 50),
        &["array claims"],
    );
    // Arrays nested 9 deep.
    let mut r = Raw::header(3, 0, 1);
    r.str(b"deep").u32(9);
    for _ in 0..9 {
        r.u32(9).u64(1);
    }
    r.u32(4).u64(1).u32(1).zeros(64);
    expect_err(&r, &["nested deeper than 8"]);
    expect_err(
        Raw::header(3, 0, 1).str(b"k").u32(13).u32(0).zeros(8),
        &["unknown value type 13"],
    );
    expect_err(
        Raw::header(3, 0, 1).str(b"k").u32(7).bytes(&[2]).zeros(8),
        &["bool value 2"],
    );
    expect_err(
        Raw::header(3, 0, 1).str(b"k\xff").u32(4).u32(0).zeros(8),
        &["not utf-8"],
    );
    expect_err(
        Raw::header(3, 0, 1).str(b"k").u32(8).str(b"\xc3"),
        &["not utf-8"],
    );
    expect_err(
        Raw::header(3, 0, 2).kv_u32("a", 1).kv_u32("a", 2),
        &["duplicate metadata key \"a\""],
    );
    expect_err(
        Raw::header(3, 0, 1).kv_u32("general.alignment", 48),
        &["general.alignment 48"],
    );
    // Tensor table.
    expect_err(
        Raw::header(3, 1, 0)
            .tensor("t", &[1, 1, 1, 1, 1], 0, 0)
            .zeros(64),
        &["5 dimensions", "limit 4"],
    );
    expect_err(
        Raw::header(3, 1, 0)
            .tensor("t", &[1 << 40, 1 << 40], 0, 0)
            .zeros(64),
        &["element count overflows"],
    );
    expect_err(
        Raw::header(3, 1, 0)
            .tensor("t", &[u64::MAX], 0, 0)
            .zeros(64),
        &["negative as int64"],
    );
    // Found by cargo fuzz (crash-55d3e49d): a zero dimension made the element count 0 while the
    // row count (product of the other dimensions) overflowed later.
    expect_err(
        Raw::header(3, 1, 0)
            .tensor("t", &[0, 1 << 40, 1 << 40], 0, 0)
            .zeros(64),
        &["element count overflows"],
    );
    expect_err(
        Raw::header(3, 1, 0)
            .tensor("t", &[8], 0, 16)
            .pad_to(32)
            .zeros(64),
        &["not a multiple of the alignment 32"],
    );
    expect_err(
        Raw::header(3, 1, 0)
            .tensor("t", &[8], 0, 4096)
            .pad_to(32)
            .zeros(64),
        &["past the end"],
    );
    expect_err(
        Raw::header(3, 1, 0)
            .tensor("t", &[64], 0, 0)
            .pad_to(32)
            .zeros(64),
        &["needs 256 bytes", "the end of the file"],
    );
    expect_err(
        Raw::header(3, 2, 0)
            .tensor("a", &[16], 0, 0)
            .tensor("b", &[16], 0, 32)
            .pad_to(32)
            .zeros(128),
        &[
            "\"a\"",
            "needs 64 bytes",
            "the next tensor starts 32 bytes later",
        ],
    );
    expect_err(
        Raw::header(3, 2, 0)
            .tensor("a", &[8], 0, 0)
            .tensor("a", &[8], 0, 32)
            .pad_to(32)
            .zeros(64),
        &["duplicate tensor name \"a\""],
    );
    expect_err(
        Raw::header(3, 1, 0)
            .tensor("q", &[100, 2], ids::TQ2_0, 0)
            .pad_to(32)
            .zeros(256),
        &["row length 100", "TQ2_0"],
    );
    expect_err(
        Raw::header(3, 1, 0).str(&[b'x'; 5000]).u32(1),
        &["tensor name length 5000"],
    );
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error() {
    let bytes = std::fs::read(fixture("metadata_v3.gguf")).unwrap();
    let f = GgufFile::from_bytes(bytes.clone()).unwrap();
    let data_start = f.data_start() as usize;
    for len in 0..bytes.len() {
        let r = GgufFile::from_bytes(bytes[..len].to_vec());
        // Cutting inside the tensor data leaves a header that points past the end.
        assert!(
            r.is_err(),
            "prefix of {len} bytes (data starts at {data_start}) was accepted"
        );
    }
}

#[test]
fn byte_flips_never_panic() {
    let bytes = std::fs::read(fixture("metadata_v3.gguf")).unwrap();
    let mut accepted = 0;
    for i in 0..bytes.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[i] ^= flip;
            if let Ok(f) = GgufFile::from_bytes(b) {
                accepted += 1;
                // Everything reachable from an accepted file must be safe to walk.
                for (_, v) in f.metadata() {
                    if let Some(a) = v.as_array() {
                        for e in a.iter() {
                            let _ = e;
                        }
                    }
                }
                for t in f.tensors() {
                    let _ = f.tensor_data(t);
                }
            }
        }
    }
    assert!(accepted > 0, "flips inside tensor data should still parse");
}

/// Every crash cargo fuzz ever found (fuzz/regressions/) and the whole fuzz corpus parse to a
/// file or an error — never a panic.
#[test]
fn fuzz_regressions_and_corpus_replay() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut n = 0;
    for dir in ["fuzz/regressions", "fuzz/corpus/gguf_reader"] {
        for entry in std::fs::read_dir(format!("{root}/{dir}")).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            if let Ok(f) = GgufFile::from_bytes(bytes) {
                for t in f.tensors() {
                    let (rows, cols) = t.rows_cols();
                    if let (Ok(ty), Ok(d)) = (t.ggml_type(), f.tensor_data(t))
                        && rows.saturating_mul(cols) <= 1 << 16
                    {
                        let _ = ternmux::quant::decode(ty, d, rows, cols);
                    }
                }
                let _ = ternmux::gguf::Report::new(&f, "replay").to_string();
            }
            n += 1;
        }
    }
    assert!(n >= 2, "no fuzz inputs found");
}

/// Found by cargo fuzz (crash-c773c993): a tensor whose offset lies past the end but is not the
/// last in offset order overflowed `data_start + offset`.
#[test]
fn regression_offset_past_end_on_a_middle_tensor() {
    let e = Raw::header(3, 2, 0)
        .tensor("a", &[8], 0, 0xffff_ffff_ffff_ffc0)
        .tensor("b", &[8], 0, 0xffff_ffff_ffff_ffe0)
        .pad_to(32)
        .zeros(64)
        .err();
    assert!(e.contains("past the end"), "{e}");
}

/// Found by cargo fuzz (crash-04a1ec7b): a tensor with no rows but a huge row length is valid
/// (0 elements), and computing its row size overflowed while decoding.
#[test]
fn regression_empty_tensor_with_huge_rows() {
    let raw = Raw::header(3, 1, 0)
        .tensor("t", &[1 << 62, 0], 0, 0)
        .pad_to(32)
        .zeros(32)
        .0
        .clone();
    let f = GgufFile::from_bytes(raw).unwrap();
    let t = f.tensor("t").unwrap();
    let (rows, cols) = t.rows_cols();
    assert_eq!((rows, cols), (0, 1 << 62));
    let d = ternmux::quant::decode(
        t.ggml_type().unwrap(),
        f.tensor_data(t).unwrap(),
        rows,
        cols,
    )
    .unwrap();
    assert!(d.is_empty());
    let _ = ternmux::gguf::Report::new(&f, "x").to_string();
}
