"""The upper blocks' keys/values before a split column, computed once (kmec.models.prefix_kv):
a forward of the remaining columns gives the hidden states a full forward gives, in every
family, and the δ loop runs only the columns from the subject's last token on."""

from __future__ import annotations

import pytest
import torch

from kmec.backends.keys import build_batch
from kmec.backends.values import ValueParams, optimise_deltas
from kmec.models.adapters import adapter_for
from kmec.models.hooks import Trace, TraceDict, get_module, hidden_of, replay_below
from kmec.models.prefix_kv import PrefixKV, align_at, cache_kwarg, forward_suffix
from kmec.planner.model import EditRequest
from tests.conftest import FAMILIES, SpaceLetterTokenizer, build_tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_the_suffix_forward_equals_the_full_forward(family):
    model = build_tiny_model(family)
    adapter = adapter_for(model.config.model_type)
    layer = 1
    torch.manual_seed(3)
    lengths = torch.tensor([9, 5, 7, 3])
    ids = torch.randint(1, 127, (4, 9))
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    ids = ids * mask
    at = torch.tensor([6, 1, 4, 0])  # the split position of each row (0: nothing before it)
    block = {}

    def keep(output, _path):
        block["out"] = output
        return output

    with torch.no_grad():
        full = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        with Trace(model, adapter.site("layer", layer), edit_output=keep, stop=True):
            model.base_model(input_ids=ids, attention_mask=mask)
        al = align_at(ids, mask, at, pad=0)
        lower = al.place(hidden_of(block["out"]))
        prefix = PrefixKV.compute(model, adapter.layers, layer, block["out"], al, lower[:, :al.split])
        assert prefix.used and al.split == 6
        with replay_below(model, adapter.layers, layer, block["out"], lambda: lower[:, al.split:]):
            h = forward_suffix(model.base_model, al.ids[:, al.split:], al.mask, al.pos[:, al.split:],
                               prefix.select(torch.arange(4)), cache_kwarg(model.base_model))
    for r in range(4):
        n = int(lengths[r] - at[r])
        torch.testing.assert_close(h[r, :n], full[r, at[r]:lengths[r]], atol=2e-5, rtol=1e-4)


def test_the_delta_loop_runs_only_the_columns_from_the_subject_on():
    model = build_tiny_model("llama")
    adapter = adapter_for(model.config.model_type)
    tok = SpaceLetterTokenizer()
    edit = EditRequest(name="a", prompt="Peru has the capital city", subject="Peru",
                       target_new="Lima")
    prefixes = ["", "a b c d e f. ", "g h i. "]
    widths: list[int] = []
    top = get_module(model, adapter.site("layer", 3))

    def record(_m, inputs, _out):
        widths.append(inputs[0].shape[1])

    handle = top.register_forward_hook(record)  # a test probe, removed below
    try:
        optimise_deltas(model, tok, adapter, 1, [edit], prefixes, ValueParams(steps=3))
    finally:
        handle.remove()
    rows = build_batch(tok, [edit], prefixes, with_targets=True)
    lengths = rows.attention_mask.sum(1)
    # widths[0]: the columns before the split (once); then each step runs from the subject's
    # last token to the target's last token but one (the whole rows before #17)
    assert widths[0] == int(rows.lookup.max())
    assert set(widths[1:]) == {int((lengths - rows.lookup).max())}
    assert max(widths[1:]) < rows.input_ids.shape[1]


def test_a_split_at_zero_needs_no_cache():
    model = build_tiny_model("gpt2")
    adapter = adapter_for(model.config.model_type)
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    al = align_at(ids, mask, torch.tensor([0]), pad=0)
    with TraceDict(model, [adapter.site("layer", 1)]):
        assert not PrefixKV.compute(model, adapter.layers, 1, None, al, torch.zeros(1, 0, 32)).used


def test_the_cache_argument_is_named_by_the_class_when_forward_is_wrapped():
    """A spy replacing an instance's forward with ``(*args, **kwargs)`` hides the argument's
    name; it is read from the class then, so the deprecated name is not used by mistake."""
    body = build_tiny_model("llama").base_model
    name = cache_kwarg(body)
    real = body.forward
    body.forward = lambda *args, **kwargs: real(*args, **kwargs)
    assert cache_kwarg(body) == name
    assert name in ("cache", "past_key_values")


def test_a_module_without_either_argument_gets_the_older_name():
    assert cache_kwarg(torch.nn.Linear(2, 2)) == "past_key_values"
