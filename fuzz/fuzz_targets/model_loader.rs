//! Fuzz the model loader and tokenizers: any GGUF bytes must load into a model or give a typed
//! error; an accepted (small) model must tokenize, detokenize and generate without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ternmux::gguf::GgufFile;
use ternmux::model::{GenerateOptions, Model};

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else { return };
    let Ok(m) = Model::from_file(f) else { return };
    let ids = m.tokenizer.encode("Hello <s> wörld 🦙 12345\n\t<|eot_id|>", true, true);
    let _ = m.tokenizer.decode(&ids);
    let c = &m.config;
    // Bound the work per input; shapes were validated against the tensors at load.
    if c.n_embd * c.n_layer > 1 << 16 || c.n_vocab > 1 << 16 || c.n_ff > 4096 {
        return;
    }
    let opts = GenerateOptions { max_tokens: 2, n_ctx: 16, ..Default::default() };
    let _ = m.generate("Hi there", &opts, |_| true);
});
