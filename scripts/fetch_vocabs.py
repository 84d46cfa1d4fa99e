#!/usr/bin/env python3
"""Fetch llama.cpp's tokenizer test vocabularies (vocab-only GGUFs with their .inp/.out cases:
input strings and llama.cpp's token ids) from the pinned llama-cpp-python sdist on PyPI, into
target/vocab/. The vocabularies are Meta's and OpenAI's; they are fetched for tests, not shipped.

    python3 scripts/fetch_vocabs.py [DEST]
"""
import hashlib
import io
import json
import os
import sys
import tarfile
import urllib.request

VERSION = "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
WANT = ["ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-bpe.gguf", "ggml-vocab-gpt-2.gguf"]


def main():
    dest = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "vocab")
    os.makedirs(dest, exist_ok=True)
    names = [n + ext for n in WANT for ext in ("", ".inp", ".out")]
    if all(os.path.exists(os.path.join(dest, n)) for n in names):
        return
    # PyPI's simple index (PEP 691 JSON), as pip uses it.
    req = urllib.request.Request("https://pypi.org/simple/llama-cpp-python/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    index = json.load(urllib.request.urlopen(req, timeout=60))
    url = next(f["url"] for f in index["files"] if f["filename"] == f"llama_cpp_python-{VERSION}.tar.gz")
    data = urllib.request.urlopen(url, timeout=300).read()
    if hashlib.sha256(data).hexdigest() != SHA256:
        sys.exit(f"fetch_vocabs: sha256 mismatch for llama-cpp-python {VERSION}")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            base = os.path.basename(m.name)
            if base in names and "/vendor/llama.cpp/models/" in m.name:
                with open(os.path.join(dest, base), "wb") as f:
                    f.write(tar.extractfile(m).read())
    missing = [n for n in names if not os.path.exists(os.path.join(dest, n))]
    if missing:
        sys.exit(f"fetch_vocabs: not found in llama-cpp-python {VERSION}: {missing}")
    print(f"fetch_vocabs: {len(names)} files from llama-cpp-python {VERSION} -> {os.path.normpath(dest)}", file=sys.stderr)


if __name__ == "__main__":
    main()
