"""``replay_below``: a forward pass from a stored block output equals the full forward pass
(every tiny family, random shapes, padded rows), puts the blocks back even on error, and the
δ optimisation built on it gives the δ of a full forward pass per step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kmec.models.adapters import adapter_for
from kmec.models.hooks import Trace, get_module, hidden_of, replay_below
from tests.conftest import FAMILIES


def _stored(model, adapter, layer, ids, mask):
    out = {}

    def keep(o, _p):
        out["o"] = o
        return o

    with torch.no_grad(), Trace(model, adapter.site("layer", layer), edit_output=keep, stop=True):
        model.base_model(input_ids=ids, attention_mask=mask)
    return out["o"]


@settings(max_examples=24, deadline=None)
@given(family=st.sampled_from(FAMILIES), layer=st.integers(0, 2), rows=st.integers(1, 4),
       width=st.integers(2, 12), data=st.data())
def test_replay_equals_the_full_forward(tiny_models, family, layer, rows, width, data):
    model = tiny_models[family]
    adapter = adapter_for(model.config.model_type)
    ids = torch.tensor(data.draw(st.lists(st.lists(st.integers(1, 127), min_size=width,
                                                   max_size=width), min_size=rows, max_size=rows)))
    lengths = data.draw(st.lists(st.integers(1, width), min_size=rows, max_size=rows))
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    stored = _stored(model, adapter, layer, ids, mask)
    add = torch.zeros_like(hidden_of(stored))
    add[:, 0] = 0.5  # a change at the replayed layer must reach the output like a hook's would

    def plus(o, _p):
        return (hidden_of(o) + add, *o[1:]) if isinstance(o, tuple) else o + add

    with torch.no_grad():
        with Trace(model, adapter.site("layer", layer), edit_output=plus):
            full = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        with replay_below(model, adapter.layers, layer, stored, lambda: hidden_of(stored) + add):
            fast = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(fast[real], full[real], atol=1e-5, rtol=1e-5)


def test_blocks_are_put_back_even_on_error(tiny_models):
    model = tiny_models["llama"]
    adapter = adapter_for(model.config.model_type)
    before = list(get_module(model, adapter.layers))
    with pytest.raises(RuntimeError), replay_below(model, adapter.layers, 1, None, lambda: None):
        raise RuntimeError("boom")
    assert list(get_module(model, adapter.layers)) == before


def test_replayed_blocks_are_not_run(tiny_models):
    model = tiny_models["gpt2"]
    adapter = adapter_for(model.config.model_type)
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    stored = _stored(model, adapter, 1, ids, mask)
    calls = []
    hooks = [get_module(model, adapter.site("layer", i)).register_forward_hook(
        lambda *_a, i=i: calls.append(i)) for i in range(4)]
    try:
        with torch.no_grad(), replay_below(model, adapter.layers, 1, stored,
                                           lambda: hidden_of(stored)):
            model.base_model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [2, 3]


def test_bf16_compute_leaves_the_model_alone_and_keeps_delta_fp32(tiny_models):
    from kmec.backends.values import ValueParams, compute_dtype, optimise_deltas
    from kmec.planner.model import EditRequest
    from tests.conftest import SpaceLetterTokenizer

    model = tiny_models["llama"]
    adapter = adapter_for(model.config.model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edits = [EditRequest(name="a", prompt="The key of abc is", subject="abc", target_new="Q")]
    base = ValueParams(steps=6, weight_decay=0.0, clamp=1e4)
    _, p32 = optimise_deltas(model, SpaceLetterTokenizer(), adapter, 1, edits, [""], base)
    d16, p16 = optimise_deltas(model, SpaceLetterTokenizer(), adapter, 1, edits, [""],
                               base.model_copy(update={"compute": "bfloat16"}))
    assert d16.dtype == torch.float32 and bool(torch.isfinite(d16).all())
    assert abs(float(p16[0]) - float(p32[0])) < 0.05
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert compute_dtype(model, "float32") == torch.float32


def test_auto_compute_follows_the_device(tiny_models, monkeypatch):
    from kmec.backends import values

    model = tiny_models["llama"]
    monkeypatch.setattr(values, "native_bf16", lambda _device: True)
    assert values.compute_dtype(model, "auto") == torch.bfloat16
    assert values.compute_model(model, torch.float32) is model
    monkeypatch.setattr(values, "native_bf16", lambda _device: False)
    assert values.compute_dtype(model, "auto") == torch.float32
    assert values.compute_dtype(model, "bfloat16") == torch.bfloat16
