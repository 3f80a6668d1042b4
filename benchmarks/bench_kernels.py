"""Benchmark the XᵀX kernels: accuracy of Triton vs the torch reference, and speed.

    .venv/bin/python benchmarks/bench_kernels.py [--json OUT] [--threads 1]

Measures, on whatever machine runs it:

* accuracy: the Triton kernel (``TRITON_INTERPRET=1`` on a CPU, the real
  kernel on CUDA) and the torch CPU path against the float64 reference, for
  fp32/bf16/fp16 inputs, ``d`` = 80 (not a multiple of the tile), masked rows:
  max |S - S_ref| / max |S_ref|;
* precision of the running sum: fp32 blocks into an fp64 total vs a plain
  fp32 running total, over 2M rows, against float64;
* speed on the CPU: the upper-triangle band path vs one full fp32 GEMM
  (d = 1536, N = 4096: the embedded model's keys), and on CUDA the Triton
  kernel vs ``torch.mm``.

The interpreter must be switched on before Triton is imported, so this
script sets TRITON_INTERPRET=1 itself when no GPU is present.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kmec.kernels import symmetrize_upper, xtx_reference
from kmec.kernels.reference import xtx_accumulate_torch


def accuracy(d: int = 80, n: int = 256) -> dict[str, dict[str, float]]:
    """Max relative error of each kernel vs the float64 reference, per input dtype."""
    from kmec.kernels.xtx import xtx_accumulate_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, float]] = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(n, d, generator=g) * 2 + 0.5).to(dtype)
        mask = torch.rand(n, generator=g) < 0.7
        ref = xtx_reference(x, mask)
        row = {}
        for name in ("triton", "torch"):
            acc = torch.zeros(d, d, dtype=torch.float64, device=device if name == "triton" else "cpu")
            if name == "triton":
                xtx_accumulate_triton(acc, x.to(device), mask.to(device))
            else:
                xtx_accumulate_torch(acc, x, mask)
            err = (symmetrize_upper(acc).cpu() - ref).abs().max() / ref.abs().max()
            row[name] = float(err)
        out[str(dtype).removeprefix("torch.")] = row
    return out


def running_sum_precision(d: int = 8, block: int = 4096, blocks: int = 500) -> dict[str, float]:
    """Relative error of fp32-block/fp64-total vs a plain fp32 running sum, over blocks×block rows."""
    g = torch.Generator().manual_seed(0)
    ours = torch.zeros(d, d, dtype=torch.float64)
    naive = torch.zeros(d, d, dtype=torch.float32)
    ref = torch.zeros(d, d, dtype=torch.float64)
    for _ in range(blocks):
        x = torch.randn(block, d, generator=g) * 0.1 + 3.0
        xtx_accumulate_torch(ours, x)
        naive += x.T @ x
        ref += x.double().T @ x.double()
    rel = lambda s: float(((s.double() - ref).abs() / ref.abs()).max())
    return {"rows": block * blocks, "fp32_blocks_fp64_total": rel(symmetrize_upper(ours)),
            "fp32_running_sum": rel(naive)}


def _time(fn, repeat: int = 5) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def speed(d: int = 1536, n: int = 4096) -> dict[str, float]:
    """Seconds per call: triangle band path vs one full GEMM (CPU); Triton vs mm (CUDA)."""
    x = torch.randn(n, d)
    acc = torch.zeros(d, d, dtype=torch.float64)
    full = torch.zeros(d, d, dtype=torch.float64)

    def gemm() -> None:
        full.add_(x.T @ x)

    out = {"cpu_torch_triangle_s": _time(lambda: xtx_accumulate_torch(acc, x)),
           "cpu_full_gemm_s": _time(gemm)}
    if torch.cuda.is_available():
        from kmec.kernels.xtx import xtx_accumulate_triton

        xc = x.cuda().bfloat16()
        accc = torch.zeros(d, d, dtype=torch.float64, device="cuda")
        out["cuda_triton_bf16_s"] = _time(lambda: xtx_accumulate_triton(accc, xc), 20)
        fullc = torch.zeros(d, d, dtype=torch.float64, device="cuda")
        out["cuda_torch_mm_bf16_s"] = _time(lambda: fullc.add_((xc.T @ xc).double()), 20)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: stable timings on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {"accuracy": accuracy(), "running_sum": running_sum_precision(), "speed": speed(),
               "triton_mode": "cuda" if torch.cuda.is_available() else "interpreter (CPU)"}
    print(f"XᵀX kernels vs float64 reference (d=80, N=256, masked; triton: {results['triton_mode']})")
    print(f"{'input':<10}{'triton max rel err':>20}{'torch max rel err':>20}")
    for dtype, row in results["accuracy"].items():
        print(f"{dtype:<10}{row['triton']:>20.2e}{row['torch']:>20.2e}")
    rs = results["running_sum"]
    print(f"running sum over {rs['rows']:,} rows: fp32 blocks + fp64 total "
          f"{rs['fp32_blocks_fp64_total']:.1e}, fp32 running sum {rs['fp32_running_sum']:.1e}")
    for k, v in results["speed"].items():
        print(f"{k:<24}{v * 1000:10.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
