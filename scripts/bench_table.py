#!/usr/bin/env python3
"""Print criterion results (target/criterion) as the Markdown tables of BENCHMARKS.md.

    cargo bench --bench kernels && python3 scripts/bench_table.py

Every row: median time, throughput in GB/s of weight bytes (1 GB = 1e9 B), and the ratio to the
`membw/read/all-threads` probe of the same run (or `membw/read/1-thread` for 1-thread rows).
"""
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "criterion")


def load():
    rows = {}
    for dirpath, _dirs, files in os.walk(ROOT):
        if os.path.basename(dirpath) != "new" or "benchmark.json" not in files:
            continue
        b = json.load(open(os.path.join(dirpath, "benchmark.json")))
        e = json.load(open(os.path.join(dirpath, "estimates.json")))
        t = e["median"]["point_estimate"] * 1e-9
        thr = b.get("throughput") or {}
        nbytes = thr.get("Bytes") or thr.get("BytesDecimal")
        elems = thr.get("Elements")
        rows[(b["group_id"], b["function_id"] or "", b["value_str"] or "")] = (t, nbytes, elems)
    return rows


def fmt_t(t):
    return f"{t * 1e6:.1f} µs" if t < 1e-2 else f"{t * 1e3:.2f} ms"


def main():
    rows = load()
    if not rows:
        sys.exit("no criterion results under target/criterion: run `cargo bench --bench kernels` first")
    probe = {k[1]: v[1] / v[0] for k, v in rows.items() if k[0] == "membw"}
    all_bw = probe.get("read/all-threads")
    one_bw = probe.get("read/1-thread")
    print("### Memory-bandwidth probe (same run)\n")
    print("| probe | GB/s |\n|---|---:|")
    for name, bw in sorted(probe.items()):
        print(f"| membw/{name} | {bw / 1e9:.2f} |")
    groups = sorted({k[0] for k in rows if k[0] != "membw"})
    for g in groups:
        ref = one_bw if "1thread" in g else all_bw
        print(f"\n### {g}\n")
        print("| kernel | shape | median | GB/s (weights) | × probe |")
        print("|---|---|---:|---:|---:|")
        for (grp, fn, val), (t, nbytes, elems) in sorted(rows.items()):
            if grp != g:
                continue
            if nbytes:
                bw = nbytes / t
                ratio = f"{bw / ref:.2f}" if ref else "–"
                print(f"| {fn} | {val} | {fmt_t(t)} | {bw / 1e9:.2f} | {ratio} |")
            else:
                per = f"{elems / t / 1e9:.2f} G elem/s" if elems else "–"
                print(f"| {fn} | {val} | {fmt_t(t)} | {per} | – |")


if __name__ == "__main__":
    main()
