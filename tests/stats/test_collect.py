"""The one-pass collector against a naive per-window, per-layer computation."""

from __future__ import annotations

import pytest
import torch

from kmec.models.adapters import adapter_for
from kmec.models.hooks import Trace
from kmec.stats import PassConfig, collect, resolve_corpus
from kmec.stats.corpus import windows
from tests.conftest import ByteTokenizer

DOCS = ["The capital of France is Paris.", "short", "A longer document " * 9, "x" * 61]


@pytest.fixture()
def corpus(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(DOCS) + "\n")
    return resolve_corpus(f)


def naive_sums(model, tok, adapter, layers, corpus, max_len, tokens):
    """Σ k kᵀ per layer, one window at a time (no padding), one pass per layer, float64."""
    out = {}
    for layer in layers:
        total = 0
        for w in windows(corpus, tok, max_len=max_len, tokens=tokens):
            with torch.no_grad(), Trace(model, adapter.site("mlp_out", layer), retain_input=True,
                                        stop=True) as t:
                model(input_ids=torch.tensor([w.ids]))
            k = t.input[0, w.n_special:].double()
            total = total + k.T @ k
        out[layer] = total
    return out


def test_one_pass_equals_naive_per_layer(tiny_models, tiny_family, corpus):
    model = tiny_models[tiny_family]
    tok = ByteTokenizer()
    adapter = adapter_for(model.config.model_type)
    config = PassConfig(max_len=24, tokens=150, batch_tokens=60, pool_size=5)
    acc = collect(model, tok, adapter, [2, 0], 64, corpus, config)
    expected = naive_sums(model, tok, adapter, [0, 2], corpus, 24, 150)
    for layer in (0, 2):
        assert acc[layer].count == 150
        torch.testing.assert_close(acc[layer].total(), expected[layer], rtol=2e-5, atol=1e-4)


def test_batching_does_not_change_the_numbers(tiny_models, corpus):
    model = tiny_models["llama"]
    adapter = adapter_for("llama")
    a = collect(model, ByteTokenizer(), adapter, [1], 64, corpus,
                PassConfig(max_len=32, tokens=10_000, batch_tokens=32, pool_size=1))
    b = collect(model, ByteTokenizer(), adapter, [1], 64, corpus,
                PassConfig(max_len=32, tokens=10_000, batch_tokens=512, pool_size=64))
    assert a[1].count == b[1].count == sum(len(d.strip()) for d in DOCS)
    torch.testing.assert_close(a[1].total(), b[1].total(), rtol=2e-5, atol=1e-4)


def test_forward_stops_after_deepest_layer(tiny_models, corpus):
    model = tiny_models["gpt2"]
    adapter = adapter_for("gpt2")
    above = adapter.site("layer", 2)
    with Trace(model, above, retain_output=True) as t:
        collect(model, ByteTokenizer(), adapter, [0, 1], 64, corpus,
                PassConfig(max_len=16, tokens=40))
    assert t.output is None  # block 2 never ran
    with Trace(model, above, retain_output=True) as t:
        collect(model, ByteTokenizer(), adapter, [3], 64, corpus, PassConfig(max_len=16, tokens=40))
    assert t.output is not None


def test_progress_and_checkpoints_are_reported(tiny_models, corpus):
    model = tiny_models["gpt_neox"]
    seen, ckpts = [], []
    collect(model, ByteTokenizer(), adapter_for("gpt_neox"), [1], 64, corpus,
            PassConfig(max_len=16, tokens=100, batch_tokens=32, pool_size=2, checkpoint_s=0),
            progress=lambda m, d, t: seen.append(d),
            on_checkpoint=lambda acc, pos, done: ckpts.append((pos, done, acc[1].count)))
    assert seen[-1] == 100 and seen == sorted(seen)
    assert ckpts and all(done == count for _, done, count in ckpts)
    assert [p for p, _, _ in ckpts] == sorted(p for p, _, _ in ckpts)
