"""SecondMoment: add / merge / state_dict, and precision over a long stream."""

from __future__ import annotations

import pytest
import torch

from kmec.kernels import xtx_reference
from kmec.stats import SecondMoment


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + 1.0


def test_moment_is_masked_mean_of_outer_products():
    x = _rows(50, 6, 0)
    mask = torch.arange(50) % 3 != 0
    sm = SecondMoment(6)
    sm.add(x, mask)
    assert sm.count == int(mask.sum())
    expected = xtx_reference(x, mask) / int(mask.sum())
    torch.testing.assert_close(sm.moment(torch.float64), expected, rtol=1e-6, atol=1e-9)
    m = sm.moment()
    assert m.dtype == torch.float32 and torch.equal(m, m.T)


def test_batched_leading_dims_and_empty_adds():
    sm = SecondMoment(4)
    sm.add(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    sm.add(torch.randn(0, 4))
    assert sm.count == 0
    with pytest.raises(ValueError, match="undefined"):
        sm.moment()
    sm.add(torch.randn(2, 3, 4))
    assert sm.count == 6
    with pytest.raises(ValueError):
        sm.add(torch.randn(3, 5))


def test_merge_of_shards_equals_one_accumulator():
    x = _rows(300, 8, 1)
    whole = SecondMoment(8)
    whole.add(x)
    parts = [SecondMoment(8) for _ in range(3)]
    for i, p in enumerate(parts):
        p.add(x[i::3])
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.count == whole.count
    torch.testing.assert_close(merged.total(), whole.total(), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError):
        merged.merge(SecondMoment(3))


def test_state_dict_round_trip():
    sm = SecondMoment(5)
    sm.add(_rows(40, 5, 2))
    state = sm.state_dict()
    assert state["sum"].dtype == torch.float64 and torch.equal(state["sum"], state["sum"].T)
    again = SecondMoment.from_state_dict(state)
    assert again.count == 40
    assert torch.equal(again.moment(torch.float64), sm.moment(torch.float64))
    again.add(_rows(10, 5, 3))  # keeps accumulating after a load
    assert again.count == 50
    with pytest.raises(ValueError):
        SecondMoment(4).load_state_dict(state)


def test_long_stream_keeps_float64_precision():
    """2M rows with a large mean: the fp32 blocks summed into a float64 total lose nothing.

    The rows are small integers, so every block's product is exact in float32
    whatever order the GEMM sums in (entries stay below 2**24), and the only
    rounding left is the running total's: exact in float64, while a float32
    total passes 2**24 after a few dozen blocks and rounds on every addition
    from then on.
    """
    d, block, blocks = 4, 4096, 500
    g = torch.Generator().manual_seed(0)
    sm = SecondMoment(d)
    ref = torch.zeros(d, d, dtype=torch.float64)
    naive = torch.zeros(d, d, dtype=torch.float32)
    for _ in range(blocks):
        x = torch.randint(1, 9, (block, d), generator=g).float()  # mean 4.5
        sm.add(x)
        xd = x.double()
        ref += xd.T @ xd
        naive += x.T @ x
    assert ref.max() > 2**25  # a float32 total rounds to multiples of 4 here
    naive_err = ((naive.double() - ref).abs() / ref.abs()).max().item()
    assert sm.count == block * blocks
    assert torch.equal(sm.total(), ref)
    assert naive_err > 1e-8  # measured 6.5e-7
