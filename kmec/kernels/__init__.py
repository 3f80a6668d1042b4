"""Kernels with explicit dispatch: Triton on CUDA, plain torch on CPU.

Contents:
    KERNELS            the implementations: "torch", "triton"
    KERNEL_ENV         environment variable that overrides the choice (KMEC_KERNEL)
    resolve_kernel()   which implementation runs for a device (and an override)
    xtx_accumulate()   acc[upper] += Σ_{n: m_n} x_n x_nᵀ  (dispatching)
    xtx_reference()    the full Gram matrix, the specification (reference.py)
    symmetrize_upper() mirror the upper triangle at the end of accumulation

Choice, first match wins: the ``kernel=`` argument, then ``$KMEC_KERNEL``
(``torch`` | ``triton`` | ``auto``), then auto: ``triton`` for CUDA tensors when
Triton imports, ``torch`` otherwise. Asking for ``triton`` with CPU tensors
needs ``TRITON_INTERPRET=1`` (set before Triton is first imported); it is
meant for tests.

>>> import torch
>>> acc = torch.zeros(2, 2, dtype=torch.float64)
>>> _ = xtx_accumulate(acc, torch.tensor([[1., 2.], [3., 4.]]), kernel="torch")
>>> symmetrize_upper(acc)
tensor([[10., 14.],
        [14., 20.]], dtype=torch.float64)
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from kmec.errors import StatsError
from kmec.kernels.reference import (
    PRODUCTS,
    Products,
    symmetrize_upper,
    xtx_accumulate_torch,
    xtx_reference,
)

log = logging.getLogger("kmec")

KERNELS = ("torch", "triton")
KERNEL_ENV = "KMEC_KERNEL"

__all__ = ["KERNELS", "KERNEL_ENV", "PRODUCTS", "Products", "resolve_kernel", "symmetrize_upper", "triton_available",
           "xtx_accumulate", "xtx_reference"]


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works here."""
    try:
        import triton  # noqa: F401
    except (ImportError, RuntimeError, OSError):  # not installed, or a broken install
        return False
    return True


def resolve_kernel(device: torch.device | str, kernel: str | None = None) -> str:
    """Pick the implementation for tensors on ``device``.

    Args:
        device: where the activations live.
        kernel: "torch", "triton", "auto" or None (None reads $KMEC_KERNEL).

    Returns:
        "torch" or "triton".

    Raises:
        StatsError: an unknown name, or "triton" where it cannot run.

    >>> resolve_kernel("cpu", "torch")
    'torch'
    """
    choice = (kernel or os.environ.get(KERNEL_ENV) or "auto").strip().lower()
    device = torch.device(device)
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice not in KERNELS:
        raise StatsError(f"unknown kernel {choice!r}", hint=f"use one of: {', '.join(KERNELS)}, auto")
    if choice == "triton":
        if not triton_available():
            raise StatsError("the triton kernel was requested but triton does not import",
                             hint="pip install triton, or use --kernel torch")
        interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        if device.type != "cuda" and not interp:
            raise StatsError(f"the triton kernel needs CUDA tensors, got {device.type}",
                             hint="set TRITON_INTERPRET=1 before importing triton to run "
                             "it on the CPU (slow; for tests), or use the torch kernel")
    return choice


def xtx_accumulate(
    acc: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kernel: str | None = None,
    products: Products = "float32",
) -> torch.Tensor:
    """Add ``Σ_{n: m_n} x_n x_nᵀ`` into the upper triangle of ``acc`` (in place).

    Each call sums its rows in float32 and adds that block into ``acc``
    (float32 or float64). Only the upper triangle (diagonal included) of
    ``acc`` is defined afterwards; finish with :func:`symmetrize_upper`.

    Args:
        acc: [d, d] float32/float64 accumulator on x's device.
        x: [..., d] float32/bfloat16/float16 activations.
        mask: [...] booleans, true for rows that count (None: all rows).
        kernel: implementation override (see :func:`resolve_kernel`).
        products: precision of the products for float32 rows: ``"float32"``,
            or ``"bfloat16"`` (rows rounded to bf16, exact products summed in
            fp32: tensor cores on CUDA, AMX on CPUs that have it). bf16 and
            fp16 rows are multiplied as they are.

    Returns:
        ``acc``.
    """
    if resolve_kernel(x.device, kernel) == "triton":
        from kmec.kernels.xtx import xtx_accumulate_triton

        if products == "bfloat16" and x.dtype == torch.float32:
            x = x.bfloat16()
        return xtx_accumulate_triton(acc, x, mask)
    return xtx_accumulate_torch(acc, x, mask, products=products)
