#!/usr/bin/env python3
"""Copy cl/ with every kernel's body cut short, for `TERNMUX_CL_DIR` ablations.

    python3 scripts/empty_kernels.py cl /tmp/cl_empty
    TERNMUX_CL_DIR=/tmp/cl_empty ternmux bench concurrency ...

Each `__kernel` returns at once (every work-item, before any barrier), except `greedy_pick`
and `get_rows`, so passes still move tokens and places: what remains is the host's queueing,
reads and waits, and each launch's fixed cost on the device. The output is garbage; the
timing says how much of a step the kernels' own work takes (BENCHMARKS.md, issue 6,
session 27).
"""
import pathlib
import re
import sys

KEEP = {"greedy_pick", "get_rows"}


def cut(src: str) -> tuple[str, int]:
    out, pos, n = [], 0, 0
    for m in re.finditer(r"__kernel\s+void\s+(\w+)\s*\(", src):
        depth, j = 0, m.end() - 1
        while True:
            if src[j] == "(":
                depth += 1
            elif src[j] == ")":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        brace = src.index("{", j)
        if m.group(1) in KEEP:
            continue
        out.append(src[pos : brace + 1] + " if (get_global_id(0) < 0x7fffffff) return; ")
        pos, n = brace + 1, n + 1
    out.append(src[pos:])
    return "".join(out), n


def main() -> None:
    src_dir, dst_dir = map(pathlib.Path, sys.argv[1:3])
    dst_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for f in sorted(src_dir.glob("*.cl")):
        text, n = cut(f.read_text())
        (dst_dir / f.name).write_text(text)
        total += n
    print(f"{total} kernels cut short in {dst_dir}")


if __name__ == "__main__":
    main()
