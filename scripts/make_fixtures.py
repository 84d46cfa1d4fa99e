#!/usr/bin/env python3
"""Write the GGUF test fixtures in tests/fixtures/ with an independent tool: PyPI `gguf` 0.19.0
(llama.cpp's own Python package). Tests compare ternmux against these files, so they need no
Python at run time.

    python3 -m pip install gguf==0.19.0 numpy
    python3 scripts/make_fixtures.py

Files (deterministic: fixed seeds):

* quant_types.gguf — for each of F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q4_K Q5_K Q6_K TQ1_0 TQ2_0:
  `<type>.q`      a 3 x 512 tensor in that type (quantized by gguf.quants.quantize where gguf-py
                  can quantize it; random blocks with finite scales for the k-quants, which gguf-py
                  only decodes),
  `<type>.expect` F32: gguf.quants.dequantize(<type>.q) — what our decoder must give bit for bit,
  `<type>.source` F32: the input that was quantized (for types gguf-py quantizes) — our encoder
                  must produce the same bytes.
* metadata_v3.gguf — one key of every value type, arrays of every element type, an array of
  arrays, an array of arrays of strings, a non-default alignment (64), tensors of several shapes.
* metadata_v2.gguf — the same file with the version field set to 2 (v2 and v3 share a layout).
"""
import os
import sys

import numpy as np

import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from importlib.metadata import version

GGUF_VERSION = version("gguf")
assert GGUF_VERSION == "0.19.0", f"fixtures are pinned to gguf 0.19.0, found {GGUF_VERSION}"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

QUANTIZABLE = [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.TQ1_0, T.TQ2_0]
DECODE_ONLY = {T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210}
ROWS, COLS = 3, 512


def source_values(rng, qtype):
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    if qtype in (T.TQ1_0, T.TQ2_0):
        # Ternary-trained weights: values in {-s, 0, s} per block plus noise so rounding is exercised.
        x = np.round(x).clip(-1, 1).astype(np.float32) * np.float32(0.037) + (rng.standard_normal(x.shape) * 0.004).astype(np.float32)
    x[0, :256] = 0.0  # an all-zero block
    x[1, 5] = 7.5     # a large outlier
    return x


def random_kquant_blocks(rng, qtype, block_bytes):
    n_blocks = ROWS * COLS // 256
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    # Give every f16 scale a finite, moderate value so dequantized numbers are finite.
    def put_f16(col):
        vals = (rng.random(n_blocks) * 0.01 + 0.0005).astype(np.float16)
        raw[:, col:col + 2] = vals.view(np.uint8).reshape(n_blocks, 2)
    if qtype in (T.Q4_K, T.Q5_K):
        put_f16(0)
        put_f16(2)
    else:  # Q6_K: d is the last field
        put_f16(block_bytes - 2)
    return raw.reshape(ROWS, COLS // 256 * block_bytes)


def quant_types(path):
    rng = np.random.default_rng(20261121)
    w = gguf.GGUFWriter(path, arch="fixture")
    f32 = source_values(rng, T.F32)
    w.add_tensor("F32.q", f32)
    w.add_tensor("F32.expect", f32)
    for qt in QUANTIZABLE:
        x = source_values(rng, qt)
        q = gguf.quants.quantize(x, qt)
        w.add_tensor(f"{qt.name}.q", q, raw_dtype=qt)
        w.add_tensor(f"{qt.name}.expect", gguf.quants.dequantize(q, qt).astype(np.float32))
        w.add_tensor(f"{qt.name}.source", x)
    for qt, bb in DECODE_ONLY.items():
        q = random_kquant_blocks(rng, qt, bb)
        w.add_tensor(f"{qt.name}.q", q, raw_dtype=qt)
        w.add_tensor(f"{qt.name}.expect", gguf.quants.dequantize(q, qt).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def metadata(path):
    w = gguf.GGUFWriter(path, arch="fixture")
    w.add_custom_alignment(64)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4000000000)
    w.add_int32("t.i32", -2000000000)
    w.add_float32("t.f32", 1.5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓ wörld")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", -2.25)
    w.add_array("t.arr_u8", [1, 2, 3])  # int → INT32 per gguf-py's inference
    w.add_key_value("t.arr_i16", [-1, 2, -3], V.ARRAY, sub_type=V.INT16)
    w.add_array("t.arr_f32", [0.5, -0.25])
    w.add_array("t.arr_bool", [True, False, True])
    w.add_array("t.arr_str", ["a", "", "ünïcode", "<0x0A>"])
    w.add_array("t.arr_arr", [[1, 2], [3], [4, 5, 6]])
    w.add_array("t.arr_arr_str", [["x", "yy"], ["zzz"]])
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(4, 16))
    w.add_tensor("b", np.arange(7, dtype=np.float32))
    w.add_tensor("c", np.ones((2, 3, 4, 32), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    os.makedirs(OUT, exist_ok=True)
    quant_types(os.path.join(OUT, "quant_types.gguf"))
    v3 = os.path.join(OUT, "metadata_v3.gguf")
    metadata(v3)
    data = bytearray(open(v3, "rb").read())
    assert data[4:8] == (3).to_bytes(4, "little")
    data[4:8] = (2).to_bytes(4, "little")
    open(os.path.join(OUT, "metadata_v2.gguf"), "wb").write(bytes(data))
    print("gguf", GGUF_VERSION, "numpy", np.__version__, "->", os.path.normpath(OUT), file=sys.stderr)


if __name__ == "__main__":
    main()
