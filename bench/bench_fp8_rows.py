"""Dequantizing V4.1's packed rows (e4m3 + UE8M0 -> bfloat16), rows/s; ends with one JSON line.

    python bench/bench_fp8_rows.py [--device cpu|cuda] [--rows 65536] [--table-rows 262144] [--repeats 9]

Side by side in one run, medians after a warm-up:
  - ``fp8_rows.dequantize`` of gathered packed rows (the store's read path after the gather);
  - the peer: torch's own float8 dtypes (view as float8_e4m3fn / float8_e8m0fnu, multiply in
    float32, round to bfloat16) -- the same values, but NaN bits left to the device;
  - the gathers themselves: packed 264-byte rows vs bfloat16 512-byte rows from a table in memory,
    so "gather packed + dequantize" can be read against "gather bfloat16" (what an unquantized
    copy of the table would cost, at 1.94x the memory).
Afterwards the result is checked against the peer on every finite value.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engram_store.format import fp8_rows  # noqa: E402


def peer(packed: torch.Tensor) -> torch.Tensor:
    n = packed.shape[0]
    vals = packed[:, : fp8_rows.VALUES].view(torch.float8_e4m3fn).to(torch.float32).view(n, fp8_rows.SCALES, -1)
    scales = packed[:, fp8_rows.VALUES:].contiguous().view(torch.float8_e8m0fnu).to(torch.float32).unsqueeze(-1)
    return (vals * scales).view(n, fp8_rows.VALUES).to(torch.bfloat16)


def median_s(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--rows", type=int, default=65536, help="rows per read (default: 65536)")
    ap.add_argument("--table-rows", type=int, default=262144, help="rows of the in-memory table (default: 262144)")
    ap.add_argument("--repeats", type=int, default=9, help="timed repeats, median reported (default: 9)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    # realistic rows: quantized normal values (scale bytes around 2^-10..2^0, as trained tables have)
    table = fp8_rows.quantize(torch.randn(args.table_rows, fp8_rows.VALUES, generator=g) * 0.02).to(dev)
    table_bf16 = fp8_rows.dequantize(table)
    ids = torch.randint(0, args.table_rows, (args.rows,), generator=g).to(dev)
    packed = table.index_select(0, ids)

    t_deq = median_s(lambda: fp8_rows.dequantize(packed), args.repeats, sync)
    t_peer = median_s(lambda: peer(packed), args.repeats, sync)
    t_gather_packed = median_s(lambda: table.index_select(0, ids), args.repeats, sync)
    t_gather_bf16 = median_s(lambda: table_bf16.index_select(0, ids), args.repeats, sync)

    out, ref = fp8_rows.dequantize(packed), peer(packed)
    finite = ~torch.isnan(ref)
    assert torch.equal(out.view(torch.int16)[finite], ref.view(torch.int16)[finite]), "dequantize disagrees with torch"
    print(json.dumps(dict(
        bench="fp8_rows", device=str(dev), rows=args.rows, threads=torch.get_num_threads(),
        dequantize_rows_per_s=round(args.rows / t_deq), peer_torch_fp8_rows_per_s=round(args.rows / t_peer),
        dequantize_vs_peer=round(t_peer / t_deq, 3),
        gather_packed_rows_per_s=round(args.rows / t_gather_packed),
        gather_bf16_rows_per_s=round(args.rows / t_gather_bf16),
        packed_read_vs_bf16_gather=round(t_gather_bf16 / (t_gather_packed + t_deq), 3),
        checked=True,
    )))


if __name__ == "__main__":
    main()
