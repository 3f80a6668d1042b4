"""Architecture adapters: every site resolves on a tiny model of each family."""

from __future__ import annotations

import pytest
import torch

from kmec.errors import ModelError
from kmec.models.adapters import ADAPTERS, adapter_for
from kmec.models.facts import facts_from_config
from kmec.models.hooks import StopForward, Trace, TraceDict, get_module


def test_sites_exist_and_weight_layout_is_declared(tiny_models, tiny_family):
    model = tiny_models[tiny_family]
    a = adapter_for(model.config.model_type)
    facts = facts_from_config(model.config, name="tiny")
    for site in ("mlp_out", "mlp", "attn", "layer"):
        get_module(model, a.site(site, facts.n_layers - 1))
    for site in ("embed", "final_norm", "layers", "lm_head"):
        get_module(model, a.site(site))
    assert get_module(model, a.site("lm_head")) is model.get_output_embeddings()
    w = get_module(model, a.site("mlp_out", 0)).weight
    expected = (facts.d_model, facts.d_mlp) if a.weight_layout == "out_in" else (facts.d_mlp, facts.d_model)
    assert tuple(w.shape) == expected


def test_unsupported_architecture_names_supported_ones():
    with pytest.raises(ModelError) as e:
        adapter_for("bert")
    msg = str(e.value)
    assert "unsupported architecture 'bert'" in msg
    for name in ADAPTERS:
        assert name in msg


def test_trace_retains_keys_and_stops(tiny_models, tiny_family):
    model = tiny_models[tiny_family]
    a = adapter_for(model.config.model_type)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    seen = []
    with TraceDict(model, [a.site("mlp_out", 0), a.site("mlp_out", 1)], retain_input=True,
                   stop=True) as td:
        model(ids)
        seen.append("not reached")
    assert seen == []  # StopForward cut the pass and the with-block swallowed it
    k = td[a.site("mlp_out", 1)].input
    assert k.shape[:2] == (1, 5)
    # hooks are removed: a normal forward runs to the end
    out = model(ids)
    assert out.logits.shape[-1] == model.config.vocab_size


def test_trace_edit_output_and_cleanup_on_error(tiny_models):
    model = tiny_models["llama"]
    a = adapter_for("llama")
    ids = torch.tensor([[3, 4, 5]])
    base = model(ids).logits
    with Trace(model, a.site("mlp_out", 1), edit_output=lambda o, _p: o * 0):
        edited = model(ids).logits
    assert not torch.allclose(base, edited)
    with pytest.raises(RuntimeError), Trace(model, a.site("mlp_out", 1),
                                            edit_output=lambda o, _p: o * 0):
        raise RuntimeError("boom")
    assert torch.allclose(model(ids).logits, base)
    assert StopForward.__mro__[1] is Exception


def test_get_module_suggests(tiny_models):
    with pytest.raises(ModelError, match="did you mean"):
        get_module(tiny_models["llama"], "model.layers.0.mlp.down_prj")
