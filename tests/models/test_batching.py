import doctest

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kmec.models import batching
from kmec.models.batching import right_pad

SEQS = st.lists(st.lists(st.integers(0, 50_000), min_size=1, max_size=12), min_size=1, max_size=6)


def test_doctests():
    assert doctest.testmod(batching).failed == 0


@given(SEQS, st.integers(0, 9))
def test_each_row_is_its_sequence_then_padding(seqs, pad):
    ids, mask = right_pad(seqs, pad)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.shape == mask.shape == (len(seqs), max(map(len, seqs)))
    for i, s in enumerate(seqs):
        assert ids[i, : len(s)].tolist() == s
        assert mask[i].tolist() == [1] * len(s) + [0] * (ids.shape[1] - len(s))
        assert (ids[i, len(s):] == pad).all()


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        right_pad([], 0)
