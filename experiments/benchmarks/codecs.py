"""Wire codec speed and size (issue 11): encode plus decode of one ResNet-18-sized update.

Each codec of `fedcmd.codecs` encodes and decodes a vector of 11.2M float32 values (ResNet-18's
parameter count) drawn like an update (normal, scale 1e-3); the target is at most 0.1 s for the pair
on one core. Measured per codec: best of `--repeats` timed pairs after one warm-up (encode and
decode timed apart, the best pair by their sum), the payload's bits per value (8 * payload bytes /
n, as `describe` counts it) and the largest decode error. numpy and torch run single-threaded
(OMP_NUM_THREADS=1 before numpy loads, torch.set_num_threads(1)), so the figures are one core's.

    nice -n -10 .venv/bin/python experiments/benchmarks/codecs.py [--values 11200000] [--repeats 5]
        [--out experiments/benchmarks/results/codecs.json]   (also writes the .md beside it)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy and torch load their thread pools

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from benchtools import command_line, machine, write_outputs

from fedcmd.codecs import Codec, describe

CASES = (
    ("none", Codec("none")),
    ("fp16", Codec("fp16")),
    ("bf16", Codec("bf16")),
    ("int8 (chunk 1024)", Codec("int8", chunk=1024)),
    ("topk 0.01", Codec("topk", fraction=0.01)),
    ("topk 0.1", Codec("topk", fraction=0.1)),
)
TARGET_SECONDS = 0.1


def time_codec(codec: Codec, x: np.ndarray, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(repeats + 1):  # the first is the warm-up
        t0 = time.perf_counter()
        arrays = codec.encode(x, rng)
        t1 = time.perf_counter()
        decoded = codec.decode(arrays, x.size)
        t2 = time.perf_counter()
        runs.append((t1 - t0, t2 - t1))
    encode, decode = min(runs[1:], key=sum)
    n, payload = describe(arrays)
    if n != x.size:
        raise RuntimeError(f"describe says {n} values, the vector has {x.size}")
    return {
        "encode_seconds": encode,
        "decode_seconds": decode,
        "seconds": encode + decode,
        "payload_bytes": payload,
        "bits_per_value": 8 * payload / x.size,
        "arrays": sorted(arrays),
        "max_abs_error": float(np.abs(decoded - x).max()),
        "all_seconds": [e + d for e, d in runs[1:]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=11_200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "codecs.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = (np.random.default_rng(1).standard_normal(args.values) * 1e-3).astype(np.float32)
    rows = []
    for label, codec in CASES:
        rows.append({"codec": label, **time_codec(codec, x, args.repeats)})
        r = rows[-1]
        print(
            f"{label:>18}: encode {r['encode_seconds']:.3f} s + decode {r['decode_seconds']:.3f} s = "
            f"{r['seconds']:.3f} s, {r['bits_per_value']:.2f} bits per value",
            flush=True,
        )
    result = {
        "command": command_line(),
        "machine": machine(),
        "values": args.values,
        "repeats": args.repeats,
        "target_seconds": TARGET_SECONDS,
        "threads": {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]},
        "rows": rows,
    }
    lines = [
        f"# Wire codecs: encode + decode of {args.values:,} float32 values",
        "",
        f"`nice -n -10 {result['command']}`",
        "",
        "| codec | encode (s) | decode (s) | total (s) | within 0.1 s | bits per value | arrays | max abs error |",
        "|---|---:|---:|---:|:---:|---:|---|---:|",
    ]
    lines += [
        f"| {r['codec']} | {r['encode_seconds']:.3f} | {r['decode_seconds']:.3f} | {r['seconds']:.3f} | "
        f"{'yes' if r['seconds'] <= TARGET_SECONDS else 'no'} | {r['bits_per_value']:.2f} | "
        f"{', '.join(r['arrays'])} | {r['max_abs_error']:.2g} |"
        for r in rows
    ]
    m = result["machine"]
    lines += [
        "",
        f"Vector: normal values of scale 1e-3 (an update's size). Best of {args.repeats} encode + decode "
        f"pairs after a warm-up; bits per value = 8 * payload bytes / n. Machine: {m['cpus']} cores, "
        f"run beside two niced experiment processes (load average {m['load_average']}), numpy "
        f"{m['numpy']} and torch {m['torch']} single-threaded (OMP_NUM_THREADS=1, "
        "torch.set_num_threads(1)).",
    ]
    write_outputs(args.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
