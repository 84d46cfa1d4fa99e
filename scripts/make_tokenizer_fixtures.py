#!/usr/bin/env python3
"""Record llama.cpp's token ids (PyPI llama-cpp-python 0.3.36, `Llama.tokenize`, vocab only) for a
set of strings on the Llama SPM, Llama-3 BPE and GPT-2 vocabularies, with and without special
tokens and BOS, into tests/fixtures/tokenizer_ids.json. Tests compare ternmux's tokenizer with
these ids, so they need no Python at run time.

    scripts/bench_vs_llamacpp.sh   # (or any way to get llama-cpp-python==0.3.36 into .dev/venv)
    python3 scripts/fetch_vocabs.py
    .dev/venv/bin/python scripts/make_tokenizer_fixtures.py
"""
import json
import os

import llama_cpp
from llama_cpp import Llama

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VOCABS = ["ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-bpe.gguf", "ggml-vocab-gpt-2.gguf"]
TEXTS = [
    "Hello world",
    " Hello world",
    "Once upon a time, there was a little girl named Lily.",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "numbers 1 12 123 1234 12345 3.14159 -42 1e10",
    "Unicode: naïve café, Äpfel, Straße, 東京, 한국어, Ελληνικά, русский",
    "emoji 🦙🚀👩‍💻 and flags 🇫🇷",
    "code: fn main() { println!(\"{}\", x[i] >= 0 && y != 'z'); }",
    "it's we're they've I'm you'll he'd DON'T",
    "<s>hello</s> <unk>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>",
    "User: Hi<|eot_id|>Assistant: ",
    "",
]


def main():
    assert llama_cpp.__version__ == "0.3.36", llama_cpp.__version__
    out = {"llama_cpp_python": llama_cpp.__version__, "vocabs": {}}
    for v in VOCABS:
        llm = Llama(model_path=os.path.join(ROOT, "target", "vocab", v), vocab_only=True, verbose=False)
        cases = []
        for text in TEXTS:
            for add_bos in (False, True):
                for special in (False, True):
                    ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
                    cases.append({"text": text, "add_special": add_bos, "parse_special": special, "ids": ids})
        out["vocabs"][v] = cases
        del llm
    path = os.path.join(ROOT, "tests", "fixtures", "tokenizer_ids.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print(f"{sum(len(c) for c in out['vocabs'].values())} cases -> {os.path.normpath(path)}")


if __name__ == "__main__":
    main()
