//! Opening a GGUF file allocates memory proportional to its metadata, not its tensor data or
//! its array contents: a counting global allocator measures `GgufFile::open`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use ternmux::gguf::{GgufFile, GgufWriter, Value, ids};

struct Counting;
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn open_costs_metadata_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.gguf");
    let tensor_bytes = 64 << 20; // 64 MiB of tensor data
    let vocab = 200_000; // a tokenizer-sized string array (≈ 2.6 MB on disk)
    {
        let mut w = GgufWriter::new();
        w.add_kv("general.architecture", Value::Str("llama".into()));
        w.add_kv(
            "tokenizer.ggml.tokens",
            Value::strings((0..vocab).map(|i| format!("token{i}"))),
        );
        w.add_tensor(
            "blob",
            &[(tensor_bytes / 4) as u64],
            ids::F32,
            vec![0u8; tensor_bytes],
        )
        .unwrap();
        for i in 0..100 {
            w.add_tensor(format!("blk.{i}.w"), &[32], ids::F32, vec![0u8; 128])
                .unwrap();
        }
        w.write_file(&path).unwrap();
    }
    let file_len = std::fs::metadata(&path).unwrap().len();
    let before = ALLOCATED.load(Ordering::Relaxed);
    let f = GgufFile::open(&path).unwrap();
    let during = ALLOCATED.load(Ordering::Relaxed) - before;
    assert_eq!(f.get_array("tokenizer.ggml.tokens").unwrap().len(), vocab);
    assert_eq!(f.tensors().len(), 101);
    eprintln!("open of a {file_len}-byte file allocated {during} bytes");
    // 101 tensor infos and 2 keys: a few KiB of names and indexes; nothing per array element
    // and nothing per tensor byte.
    assert!(
        during < 64 * 1024,
        "open allocated {during} bytes for a {file_len}-byte file"
    );
}
