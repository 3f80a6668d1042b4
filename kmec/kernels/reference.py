"""Plain-torch twins of the kernels: the specification they are tested against.

Contents:
    xtx_reference()       S = Σ_{n: m_n} x_n x_nᵀ, the whole matrix, in one GEMM
    xtx_accumulate_torch() acc[upper] += Σ_{n: m_n} x_n x_nᵀ, block rows of the
                          upper triangle only (the CPU path of the dispatcher)
    symmetrize_upper()    mirror the upper triangle (diagonal included) of a
                          square matrix onto its lower triangle

Both accumulate functions share one contract with the Triton kernel in
:mod:`kmec.kernels.xtx`: only the upper triangle (``i <= j``, diagonal
included) of ``acc`` is defined after the call; the lower triangle is scratch.
Call :func:`symmetrize_upper` once at the end (the mirror is O(d²), the
accumulation O(N·d²)).

Precision: the product of each call is summed in float32 (one block of
tokens), then added into ``acc``, which may be float64. Summing many fp32 blocks
into an fp64 total keeps the running sum exact to ~1e-12 relative over
millions of tokens, where a single fp32 running sum drifts by ~N·2⁻²⁴.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Literal

import torch

Products = Literal["float32", "bfloat16"]
PRODUCTS: tuple[str, ...] = ("float32", "bfloat16")


def _select_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` (flattened to [N, d]) whose mask is true, as float32."""
    x = x.reshape(-1, x.shape[-1])
    if mask is not None:
        mask = mask.reshape(-1).to(device=x.device, dtype=torch.bool)
        if mask.numel() != x.shape[0]:
            raise ValueError(f"mask has {mask.numel()} entries for {x.shape[0]} rows")
        if not bool(mask.all()):
            x = x[mask]
    return x.float()


def xtx_reference(
    x: torch.Tensor, mask: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The full Gram matrix of the unmasked rows: ``S = X_mᵀ X_m``.

    Args:
        x: [..., d] activations (any float dtype); leading dims are flattened.
        mask: [...] booleans, true for rows that count (None: all rows).
        dtype: dtype of the computation and of the result.

    Returns:
        [d, d] symmetric matrix ``Σ_n m_n x_n x_nᵀ``.

    >>> xtx_reference(torch.tensor([[1., 2.], [3., 4.]]), torch.tensor([True, False]))
    tensor([[1., 2.],
            [2., 4.]], dtype=torch.float64)
    """
    rows = _select_rows(x, mask).to(dtype)
    return rows.T @ rows


def symmetrize_upper(acc: torch.Tensor) -> torch.Tensor:
    """Return ``triu(A) + triu(A, 1)ᵀ``: the upper triangle mirrored (a new tensor).

    >>> symmetrize_upper(torch.tensor([[1., 2.], [99., 3.]]))
    tensor([[1., 2.],
            [2., 3.]])
    """
    upper = torch.triu(acc)
    return upper + torch.triu(acc, 1).T


@functools.cache
def onednn_bf16() -> bool:
    """Whether fp32 GEMMs on this CPU can run as bf16 products in oneDNN (AMX / AVX512-BF16)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported",
                                                    "_is_avx512_bf16_supported")]
    try:
        hw = any(bool(c()) for c in checks if c is not None)
    except RuntimeError:
        hw = False
    mkldnn = getattr(torch.backends, "mkldnn", None)
    return hw and mkldnn is not None and mkldnn.is_available() and hasattr(mkldnn, "matmul")


@contextlib.contextmanager
def _bf16_gemms() -> Iterator[None]:
    """fp32 GEMMs inside round their inputs to bf16 and accumulate in fp32 (oneDNN)."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def xtx_accumulate_torch(
    acc: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    block: int | None = None,
    products: Products = "float32",
) -> torch.Tensor:
    """Add ``X_mᵀ X_m`` into the upper triangle of ``acc``, in place.

    The rows of the triangle are computed in bands of height ``b``:
    ``P[i:i+b, i:] = X[:, i:i+b]ᵀ X[:, i:]`` (float32 GEMMs on transposed
    views, which BLAS takes without a copy), and each band is added into
    ``acc`` (float32 or float64). With four bands (the default,
    ``b = max(256, ⌈d/4⌉)``) this is 62.5 % of the full GEMM's multiply-adds
    in four large GEMM calls; on one core of this project's CPUs it takes
    ~0.65× the time of ``XᵀX`` for d = 1536.

    Args:
        acc: [d, d] float32/float64 accumulator (upper triangle is updated).
        x: [..., d] activations; leading dims are flattened.
        mask: [...] booleans, true for rows that count (None: all rows).
        block: band height (None: four bands).
        products: ``"float32"``: fp32 rows, fp32 products. ``"bfloat16"``:
            each fp32 row is rounded to bf16 first (bf16/fp16 rows are used as
            they are); products of bf16 values are
            exact in fp32 and are summed in fp32, so the result is that of
            ``round_bf16(X)ᵀ round_bf16(X)`` on every machine; on CPUs with
            AMX/AVX512-BF16 oneDNN's bf16 GEMM computes it ~2.7x faster than
            the fp32 GEMM, elsewhere the fp32 GEMM runs on the rounded rows.

    Returns:
        ``acc`` (for chaining).
    """
    if products not in PRODUCTS:
        raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}")
    rows = _select_rows(x, mask)
    fast = False
    if products == "bfloat16" and x.dtype not in (torch.bfloat16, torch.float16):
        # Round explicitly: oneDNN takes its bf16 path only for large enough
        # GEMMs (small ones stay fp32), and rows already on the bf16 grid give
        # the same exact products on either path.
        rows = rows.bfloat16().float()
        fast = onednn_bf16() and rows.device.type == "cpu"
    d = rows.shape[1]
    if acc.shape != (d, d):
        raise ValueError(f"accumulator shape {tuple(acc.shape)} does not match d={d}")
    if rows.shape[0] == 0:
        return acc
    b = block or max(256, -(-d // 4))
    with _bf16_gemms() if fast else contextlib.nullcontext():
        for i in range(0, d, b):
            j = min(i + b, d)
            # fp32 partial for this block of tokens, added in acc's dtype without a temporary
            acc[i:j, i:].add_(rows[:, i:j].T @ rows[:, i:])
    return acc
