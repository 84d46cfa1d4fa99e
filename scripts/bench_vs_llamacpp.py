#!/usr/bin/env python3
"""ternmux vs llama.cpp, side by side, same GGUF files, same machine, same run.

    scripts/bench_vs_llamacpp.sh            # installs the pinned peer, builds ternmux, runs this

llama.cpp is PyPI `llama-cpp-python` (pinned in bench_vs_llamacpp.sh; it builds llama.cpp from
source). For each model and thread count both engines process the same random prompt of
--prompt-tokens as one batch (prefill) and then decode --gen-tokens one at a time; the best of
--reps is reported, as llama-bench does. ternmux runs through `ternmux bench --json`.

Correctness: for each model, both engines' logits after the same prompt are compared:
cosine similarity (threshold 0.99) and whether the top-1 token agrees. Activation numerics differ
on purpose (ternmux quantizes per token as BitNet was trained; llama.cpp per 256-block Q8_K), so
the logits are close, not identical.
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TERNMUX = os.path.join(ROOT, "target", "release", "ternmux")


def ternmux_bench(model, threads, pp, tg, reps, logits_out=None):
    cmd = [TERNMUX, "bench", "--json", "-m", model, "-t", str(threads), "-p", str(pp), "-n", str(tg), "-r", str(reps)]
    if logits_out:
        cmd += ["--logits-out", logits_out]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def read_logits(path):
    data = open(path, "rb").read()
    n = struct.unpack_from("<I", data, 0)[0]
    ids = list(struct.unpack_from(f"<{n}I", data, 4))
    off = 4 + 4 * n
    v = struct.unpack_from("<I", data, off)[0]
    logits = np.frombuffer(data, dtype="<f4", count=v, offset=off + 4)
    return ids, logits


def llama_bench(model, threads, prompt, tg, reps):
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=len(prompt) + tg + 8, n_batch=max(512, len(prompt)), n_ubatch=max(512, len(prompt)),
                n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False, use_mmap=True)
    best_pp, best_tg, first_logits = float("inf"), float("inf"), None
    n_vocab = llm.n_vocab()

    def last_logits():
        # With logits_all=False llama-cpp-python no longer copies logits into `scores`: read the
        # last token's logits from the context.
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).astype(np.float32)

    for _ in range(reps):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        best_pp = min(best_pp, time.perf_counter() - t)
        if first_logits is None:
            first_logits = last_logits()
        t = time.perf_counter()
        for _ in range(tg):
            nxt = int(np.argmax(last_logits()))
            llm.eval([nxt])
        best_tg = min(best_tg, time.perf_counter() - t)
    del llm
    return len(prompt) / best_pp, (tg / best_tg if tg else 0.0), first_logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}; ternmux {TERNMUX}", file=sys.stderr)
    rows, checks = [], []
    for model in args.models:
        name = os.path.basename(model)
        for th in args.threads:
            lg = f"/tmp/ternmux-logits-{os.getpid()}.bin"
            ours = ternmux_bench(model, th, args.prompt_tokens, args.gen_tokens, args.reps, logits_out=lg)
            ids, our_logits = read_logits(lg)
            pp, tg, peer_logits = llama_bench(model, th, ids, args.gen_tokens, args.reps)
            rows.append((name, th, ours["prefill_tok_s"], pp, ours["decode_tok_s"], tg))
            if th == args.threads[0]:
                cos = float(np.dot(our_logits, peer_logits) / (np.linalg.norm(our_logits) * np.linalg.norm(peer_logits)))
                same = int(np.argmax(our_logits)) == int(np.argmax(peer_logits))
                checks.append((name, cos, same, int(np.argmax(our_logits)), int(np.argmax(peer_logits))))
            print(f"done {name} t{th}", file=sys.stderr)
    print(f"\nprompt {args.prompt_tokens} tokens, decode {args.gen_tokens} tokens, best of {args.reps}\n")
    print("| model | threads | prefill ternmux | prefill llama.cpp | ratio | decode ternmux | decode llama.cpp | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, th, opp, ppp, otg, ptg in rows:
        print(f"| {name} | {th} | {opp:.1f} | {ppp:.1f} | {opp / ppp:.2f}× | {otg:.2f} | {ptg:.2f} | {otg / ptg:.2f}× |")
    print("\n| model | logits cosine (ternmux vs llama.cpp) | same top-1 | top-1 ternmux / llama.cpp |")
    print("|---|---:|---|---|")
    ok = True
    for name, cos, same, a, b in checks:
        print(f"| {name} | {cos:.5f} | {'yes' if same else 'no'} | {a} / {b} |")
        ok &= cos >= 0.99
    if not ok:
        print("\nlogits disagree beyond the 0.99 cosine threshold", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
