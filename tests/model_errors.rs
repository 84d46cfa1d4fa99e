//! GGUFs whose tensors or metadata do not fit their architecture fail at load, naming the
//! tensor or key.

use ternmux::gguf::{GgufFile, GgufWriter, Value};
use ternmux::model::Model;

fn bundled() -> GgufFile {
    GgufFile::open(format!(
        "{}/models/bitllama2c-stories3M-TQ2_0.gguf",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Rewrites the bundled model with `edit` applied to the metadata and tensor list.
fn rewrite(
    edit: impl Fn(&str, &mut Option<Value>),
    drop_tensor: Option<&str>,
    reshape: Option<(&str, Vec<u64>)>,
) -> String {
    let f = bundled();
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        let mut v = Some(Value::from_meta(&v).unwrap());
        edit(k, &mut v);
        if let Some(v) = v {
            w.add_kv(k, v);
        }
    }
    for t in f.tensors() {
        if Some(t.name()) == drop_tensor {
            continue;
        }
        let dims = match &reshape {
            Some((n, d)) if *n == t.name() => d.clone(),
            _ => t.dims().to_vec(),
        };
        w.add_tensor(t.name(), &dims, t.type_id(), f.raw_tensor_data(t).to_vec())
            .unwrap();
    }
    match Model::from_file(GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap()) {
        Ok(_) => panic!("a broken model loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_tensor_is_named() {
    let e = rewrite(|_, _| {}, Some("blk.3.ffn_down.weight"), None);
    assert!(
        e.contains("missing tensor \"blk.3.ffn_down.weight\""),
        "{e}"
    );
}

#[test]
fn wrong_shape_is_named() {
    let e = rewrite(
        |_, _| {},
        None,
        Some(("blk.1.attn_k.weight", vec![256, 64])),
    );
    assert!(
        e.contains("blk.1.attn_k.weight") && e.contains("[256, 64]") && e.contains("[256, 128]"),
        "{e}"
    );
}

#[test]
fn unknown_architecture_is_named() {
    let e = rewrite(
        |k, v| {
            if k == "general.architecture" {
                *v = Some(Value::Str("mamba".into()))
            }
        },
        None,
        None,
    );
    assert!(e.contains("unknown architecture \"mamba\""), "{e}");
}

#[test]
fn missing_key_is_named() {
    let e = rewrite(
        |k, v| {
            if k == "bitnet.block_count" {
                *v = None
            }
        },
        None,
        None,
    );
    assert!(e.contains("missing key bitnet.block_count"), "{e}");
    let e = rewrite(
        |k, v| {
            if k == "bitnet.attention.head_count_kv" {
                *v = Some(Value::U32(3))
            }
        },
        None,
        None,
    );
    assert!(e.contains("head_count_kv 3"), "{e}");
}

#[test]
fn unsupported_tokenizer_is_named() {
    let e = rewrite(
        |k, v| {
            if k == "tokenizer.ggml.model" {
                *v = Some(Value::Str("rwkv".into()))
            }
        },
        None,
        None,
    );
    assert!(e.contains("tokenizer") && e.contains("rwkv"), "{e}");
}
