"""The XᵀX kernels against their reference: Triton (interpreted on CPU) and torch.

Weird shapes on purpose: d not a multiple of the tile, N = 1, N = 0, empty
and full masks; inputs in fp32/bf16/fp16 and accumulators in fp32/fp64.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kmec.kernels.reference as reference_module
from kmec.errors import StatsError
from kmec.kernels import resolve_kernel, symmetrize_upper, xtx_accumulate, xtx_reference
from kmec.kernels.reference import xtx_accumulate_torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (rtol, atol) relative to Σ|x_n||x_n|ᵀ, the bound of a float32 summation's error.
# The reference sums the *same rounded inputs* in float64, so the tolerance
# covers float32 accumulation order only; half-precision inputs are exact in
# fp32 products, hence the same budget.
TOL = {torch.float32: 3e-6, torch.bfloat16: 3e-6, torch.float16: 3e-6}


def _inputs(n: int, d: int, dtype: torch.dtype, mask_kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g) * 3 + 0.5).to(dtype)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "empty":
        mask = torch.zeros(n, dtype=torch.bool)
    elif mask_kind == "full":
        mask = torch.ones(n, dtype=torch.bool)
    else:
        mask = torch.rand(n, generator=g) < 0.6
    return x, mask


def _check(acc0: torch.Tensor, acc: torch.Tensor, x: torch.Tensor, mask, dtype) -> None:
    ref = symmetrize_upper(acc0.double()) + xtx_reference(x, mask)
    bound = xtx_reference(x.abs(), mask) + symmetrize_upper(acc0.double()).abs() + 1e-30
    got = symmetrize_upper(acc).double()
    rtol = TOL[dtype] if acc.dtype == torch.float64 else TOL[dtype] + 2e-7
    err = ((got - ref).abs() / bound).max().item() if got.numel() else 0.0
    assert err <= rtol, f"relative error {err:.3g} > {rtol:.3g}"


shapes = st.tuples(st.integers(0, 70), st.integers(1, 80))
settings_interp = settings(max_examples=25, deadline=None,
                           suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings_interp
@given(shape=shapes, dtype=st.sampled_from(DTYPES),
       mask_kind=st.sampled_from(["none", "random", "empty", "full"]),
       acc_dtype=st.sampled_from([torch.float32, torch.float64]),
       blocks=st.sampled_from([(16, 16), (32, 16), (16, 32)]), seed=st.integers(0, 2**16))
def test_triton_matches_reference(xtx_interp, shape, dtype, mask_kind, acc_dtype, blocks, seed):
    n, d = shape
    x, mask = _inputs(n, d, dtype, mask_kind, seed)
    acc0 = torch.triu(torch.randn(d, d, dtype=acc_dtype))
    acc = acc0.clone()
    xtx_interp.xtx_accumulate_triton(acc, x, mask, block_d=blocks[0], block_n=blocks[1])
    _check(acc0, acc, x, mask, dtype)


@pytest.mark.parametrize("n,d", [(1, 1), (1, 17), (33, 16), (5, 80), (0, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_edge_shapes(xtx_interp, n, d, dtype):
    x, mask = _inputs(n, d, dtype, "random", 3)
    acc = torch.zeros(d, d, dtype=torch.float64)
    xtx_interp.xtx_accumulate_triton(acc, x, mask)
    _check(torch.zeros(d, d), acc, x, mask, dtype)


def test_triton_empty_mask_leaves_accumulator_alone(xtx_interp):
    x = torch.randn(20, 24)
    acc = torch.triu(torch.randn(24, 24, dtype=torch.float64))
    before = acc.clone()
    xtx_interp.xtx_accumulate_triton(acc, x, torch.zeros(20, dtype=torch.bool))
    assert torch.equal(acc, before)


def test_triton_writes_only_upper_tiles(xtx_interp):
    # Tiles strictly below the diagonal are never touched (half the work).
    d = 40
    acc = torch.full((d, d), -7.0, dtype=torch.float64)
    xtx_interp.xtx_accumulate_triton(acc, torch.ones(3, d), block_d=16, block_n=16)
    assert (acc[32:, :16] == -7.0).all() and (acc[16:32, :16] == -7.0).all()
    upper = torch.triu(torch.ones(d, d, dtype=torch.bool))
    assert (acc[upper] == -7.0 + 3.0).all()  # every upper entry got Σ 1·1 over 3 rows


def test_triton_rejects_bad_inputs(xtx_interp):
    with pytest.raises(ValueError):
        xtx_interp.xtx_accumulate_triton(torch.zeros(3, 3), torch.randn(4, 5))
    with pytest.raises(ValueError):
        xtx_interp.xtx_accumulate_triton(torch.zeros(3, 3, dtype=torch.int32), torch.randn(4, 3))
    with pytest.raises(ValueError):
        xtx_interp.xtx_accumulate_triton(torch.zeros(3, 3), torch.randn(4, 3), torch.ones(5))


def test_autotune_configs_are_declared(xtx_interp):
    tuned = xtx_interp._xtx_tuned
    assert len(tuned.configs) >= 4
    assert "acc_ptr" in tuned.restore_value  # trial runs must not double-count
    assert {c.kwargs["BLOCK_D"] for c in tuned.configs} >= {64, 128}


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(st.integers(0, 200), st.integers(1, 200)), dtype=st.sampled_from(DTYPES),
       mask_kind=st.sampled_from(["none", "random", "empty"]), block=st.sampled_from([1, 7, 64, 256]),
       seed=st.integers(0, 2**16))
def test_torch_matches_reference(shape, dtype, mask_kind, block, seed):
    n, d = shape
    x, mask = _inputs(n, d, dtype, mask_kind, seed)
    acc0 = torch.triu(torch.randn(d, d, dtype=torch.float64))
    acc = acc0.clone()
    xtx_accumulate_torch(acc, x, mask, block=block)
    _check(acc0, acc, x, mask, dtype)


ONEDNN_BF16 = reference_module.onednn_bf16()  # this machine's answer, before any patching


def _rounded(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16() if x.dtype == torch.float32 else x


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.tuples(st.integers(0, 200), st.integers(1, 200)), dtype=st.sampled_from(DTYPES),
       mask_kind=st.sampled_from(["none", "random", "empty"]), block=st.sampled_from([1, 7, 64, 256]),
       onednn=st.booleans(), seed=st.integers(0, 2**16))
def test_bf16_products_are_exact_products_of_rounded_rows(monkeypatch, shape, dtype, mask_kind,
                                                           block, onednn, seed):
    # Same numbers on the oneDNN bf16 path and on the portable "round, then fp32 GEMM" path:
    # both equal the float64 Gram matrix of the bf16-rounded rows up to fp32 summation.
    import kmec.kernels.reference as ref

    onednn = onednn and ONEDNN_BF16
    monkeypatch.setattr(ref, "onednn_bf16", lambda: onednn)
    n, d = shape
    x, mask = _inputs(n, d, dtype, mask_kind, seed)
    acc0 = torch.triu(torch.randn(d, d, dtype=torch.float64))
    acc = acc0.clone()
    ref.xtx_accumulate_torch(acc, x, mask, block=block, products="bfloat16")
    _check(acc0, acc, _rounded(x), mask, torch.bfloat16)


def test_bf16_products_on_triton(xtx_interp):
    x, mask = _inputs(45, 37, torch.float32, "random", 5)
    acc = torch.zeros(37, 37, dtype=torch.float64)
    xtx_accumulate(acc, x, mask, kernel="triton", products="bfloat16")
    _check(torch.zeros(37, 37), acc, x.bfloat16(), mask, torch.bfloat16)


def test_bf16_products_differ_from_fp32_by_rounding_only():
    x = torch.randn(500, 64) * 2
    a32 = torch.zeros(64, 64, dtype=torch.float64)
    a16 = torch.zeros(64, 64, dtype=torch.float64)
    xtx_accumulate_torch(a32, x)
    xtx_accumulate_torch(a16, x, products="bfloat16")
    rel = float((symmetrize_upper(a16) - symmetrize_upper(a32)).norm() / symmetrize_upper(a32).norm())
    assert 1e-6 < rel < 5e-3  # bf16 rounding (2^-9 per factor), not noise-free, not wrong
    with pytest.raises(ValueError, match="products"):
        xtx_accumulate_torch(a32, x, products="int8")


def test_leading_dims_are_flattened():
    x = torch.randn(3, 5, 9)
    mask = torch.rand(3, 5) < 0.5
    acc = torch.zeros(9, 9, dtype=torch.float64)
    xtx_accumulate(acc, x, mask, kernel="torch")
    torch.testing.assert_close(symmetrize_upper(acc), xtx_reference(x.reshape(-1, 9), mask.reshape(-1)),
                               rtol=1e-5, atol=1e-5)


def test_dispatch(monkeypatch, xtx_interp):
    monkeypatch.delenv("KMEC_KERNEL", raising=False)
    assert resolve_kernel("cpu") == "torch"
    assert resolve_kernel("cuda") == "triton"
    monkeypatch.setenv("KMEC_KERNEL", "torch")
    assert resolve_kernel("cuda") == "torch"
    assert resolve_kernel("cpu", "triton") == "triton"  # the argument wins; interpreter is on
    monkeypatch.setenv("KMEC_KERNEL", "cuda-magic")
    with pytest.raises(StatsError, match="unknown kernel"):
        resolve_kernel("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(StatsError, match="needs CUDA"):
        resolve_kernel("cpu", "triton")


def test_env_var_routes_to_triton(monkeypatch, xtx_interp):
    monkeypatch.setenv("KMEC_KERNEL", "triton")
    x = torch.randn(19, 21)
    acc = torch.zeros(21, 21, dtype=torch.float64)
    xtx_accumulate(acc, x)
    torch.testing.assert_close(symmetrize_upper(acc), xtx_reference(x), rtol=1e-5, atol=1e-5)
