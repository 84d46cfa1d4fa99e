//! GGUF files: a zero-copy reader over a memory mapping and a writer.
//!
//! The reader is our own (not gguf-rs, which copies the whole file and truncates tokenizer
//! arrays; see CRATES.md): it is total over hostile input, keeps tensor data in the mapping and
//! metadata arrays as byte ranges, and knows the type-id dialects of llama.cpp, bitnet.cpp and
//! ik_llama.cpp.

mod inspect;
mod reader;
mod types;
mod writer;

pub use inspect::Report;
pub use reader::{
    DEFAULT_ALIGNMENT, GgufFile, MAX_DIMS, MAX_KEY_LEN, MAX_NESTING, MAX_TENSOR_NAME_LEN,
    MetaArray, MetaArrayIter, MetaValue, TensorInfo, ValueType,
};
pub use types::{GgmlType, TypeInfo, ids};
pub use writer::{GgufWriter, Value};
