"""Triton kernel: masked ``XᵀX`` accumulated into the upper triangle of a matrix.

Contents:
    _xtx_kernel          @triton.jit body: one program per (i, j) tile, i <= j
    _xtx_tuned           the same body under @triton.autotune (CUDA)
    interpreting()       whether TRITON_INTERPRET=1 is in effect
    xtx_accumulate_triton()  launcher: acc[upper] += Σ_{n: m_n} x_n x_nᵀ

Math. For a block of N token rows ``X`` ([N, d], fp32/bf16/fp16) and a row
mask ``m``, each program owns one output tile ``(I, J)`` of the ``[d, d]``
matrix with ``I <= J`` (tiles below the diagonal exit at once, so the kernel
does about half of a GEMM's work) and computes

    P_IJ = Σ_n m_n · X[n, I]ᵀ X[n, J]          (fp32, tl.dot over row blocks)
    acc[I, J] += P_IJ                          (in acc's dtype: fp32 or fp64)

Tiles are written by exactly one program, so the result is deterministic
and needs no atomics. Only the upper triangle of ``acc`` is defined
afterwards; :func:`kmec.kernels.symmetrize_upper` mirrors it once at the end.

fp32 inputs use ``input_precision="ieee"``: TF32 would round each factor to
10 mantissa bits, a 1e-3 relative error in the moments. bf16/fp16 inputs go
to the tensor cores as they are (products are exact in fp32).

Under ``TRITON_INTERPRET=1`` (CPU tests), triton 3.9's interpreter multiplies
bf16 tiles as their raw uint16 bit patterns inside ``tl.dot``; the launcher
then asks the kernel to widen tiles to fp32 first (``UPCAST``), which is the
same arithmetic (bf16 products are exact in fp32) in another order.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_D": bd, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bd, bn, w, s in (
        (64, 32, 4, 3),
        (64, 64, 4, 3),
        (128, 32, 8, 3),
        (128, 64, 8, 3),
        (64, 128, 4, 4),
    )
]


@triton.jit
def _xtx_kernel(
    x_ptr,
    mask_ptr,
    acc_ptr,
    N,
    D,
    stride_xn,
    stride_xd,
    stride_acc,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_i > pid_j:  # lower triangle: the mirror fills it in later
        return
    offs_i = pid_i * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = pid_j * BLOCK_D + tl.arange(0, BLOCK_D)
    col_i = offs_i < D
    col_j = offs_j < D
    part = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rows = offs_n < N
        if HAS_MASK:
            keep = tl.load(mask_ptr + offs_n, mask=rows, other=0)
            rows = rows & (keep != 0)
        base = x_ptr + offs_n[:, None] * stride_xn
        a = tl.load(base + offs_i[None, :] * stride_xd, mask=rows[:, None] & col_i[None, :],
                    other=0.0)
        b = tl.load(base + offs_j[None, :] * stride_xd, mask=rows[:, None] & col_j[None, :],
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            part += tl.dot(tl.trans(a), b, input_precision="ieee")
        else:
            part += tl.dot(tl.trans(a), b)
    out = acc_ptr + offs_i[:, None] * stride_acc + offs_j[None, :]
    inside = col_i[:, None] & col_j[None, :]
    prev = tl.load(out, mask=inside, other=0.0)
    tl.store(out, prev + part.to(prev.dtype), mask=inside)


# Autotuning runs the kernel several times per shape; restore_value keeps
# those trial runs from adding into the accumulator more than once.
_xtx_tuned = triton.autotune(configs=_AUTOTUNE_CONFIGS, key=["D"], restore_value=["acc_ptr"])(
    _xtx_kernel
)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def xtx_accumulate_triton(
    acc: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    block_d: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Add ``X_mᵀ X_m`` into the upper triangle of ``acc`` with the Triton kernel.

    Args:
        acc: [d, d] float32/float64 accumulator, contiguous, on x's device.
        x: [..., d] float32/bfloat16/float16 activations (leading dims flattened).
        mask: [...] booleans, true for rows that count (None: all rows).
        block_d, block_n: fixed tile sizes; None autotunes on CUDA and uses
            16 × 16 tiles under the interpreter.

    Returns:
        ``acc``.

    Raises:
        ValueError: shapes, dtypes or devices that the kernel does not take.
    """
    x2 = x.reshape(-1, x.shape[-1])
    n, d = x2.shape
    if acc.shape != (d, d) or not acc.is_contiguous():
        raise ValueError(f"accumulator must be a contiguous [{d}, {d}] tensor")
    if acc.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"accumulator dtype {acc.dtype} is not float32/float64")
    if x2.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"input dtype {x2.dtype} is not float32/bfloat16/float16")
    if acc.device != x2.device:
        raise ValueError(f"accumulator on {acc.device} but input on {x2.device}")
    if n == 0:
        return acc
    keep = None
    if mask is not None:
        keep = mask.reshape(-1).to(device=x2.device, dtype=torch.uint8).contiguous()
        if keep.numel() != n:
            raise ValueError(f"mask has {keep.numel()} entries for {n} rows")
    interp = interpreting()
    flags = {"HAS_MASK": keep is not None, "IEEE": x2.dtype == torch.float32,
             "UPCAST": interp and x2.dtype == torch.bfloat16}
    args = (x2, keep if keep is not None else x2, acc, n, d, x2.stride(0), x2.stride(1),
            acc.stride(0))
    if block_d is None and not interp:
        grid = lambda meta: (triton.cdiv(d, meta["BLOCK_D"]), triton.cdiv(d, meta["BLOCK_D"]))
        _xtx_tuned[grid](*args, **flags)
    else:
        bd, bn = block_d or 16, block_n or 16
        tiles = triton.cdiv(d, bd)
        _xtx_kernel[(tiles, tiles)](*args, **flags, BLOCK_D=bd, BLOCK_N=bn)
    return acc
