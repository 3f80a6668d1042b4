"""provider(): the StatsProvider backends use — cache hits, one pass, resume, errors."""

from __future__ import annotations

import logging

import pytest
import torch

from kmec.backends.base import StatsProvider
from kmec.errors import StatsError
from kmec.models.adapters import adapter_for
from kmec.models.facts import facts_from_config
from kmec.planner.model import StatsRequest
from kmec.stats import DEFAULT_MAX_LEN, DEFAULT_TOKENS, StatsCache, provider
from tests.conftest import ByteTokenizer


@pytest.fixture()
def llama(tiny_models):
    model = tiny_models["llama"]
    return model, ByteTokenizer(), facts_from_config(model.config, name="tiny-llama"), \
        adapter_for("llama")


def make(llama, tmp_path, layers=(1, 2), tokens=1500, **kw):
    model, tok, facts, adapter = llama
    request = StatsRequest(layers=layers, tokens=tokens, max_len=48)
    return provider(model, tok, facts, adapter, request, cache=StatsCache(tmp_path), **kw)


def test_defaults_match_the_planner():
    import importlib

    require_stats = importlib.import_module("kmec.planner.passes.require_stats")
    assert (DEFAULT_TOKENS, DEFAULT_MAX_LEN) == (100_000, 256)
    assert require_stats.DEFAULT_TOKENS == DEFAULT_TOKENS
    assert require_stats.DEFAULT_MAX_LEN == DEFAULT_MAX_LEN


def test_second_moment_is_a_symmetric_psd_matrix(llama, tmp_path):
    stats = make(llama, tmp_path)
    assert isinstance(stats, StatsProvider)
    c = stats.second_moment(2)
    assert c.shape == (64, 64) and c.dtype == torch.float32
    assert torch.equal(c, c.T)
    assert torch.linalg.eigvalsh(c.double()).min() > -1e-6
    assert stats.count(1) == 1500
    assert stats.sources == {1: "computed (1500 tokens)", 2: "computed (1500 tokens)"}


def test_cache_hit_runs_no_forward_and_fewer_tokens_reuse(llama, tmp_path):
    first = make(llama, tmp_path).second_moment(1)
    calls = []
    again = make(llama, tmp_path, tokens=700, progress=lambda *a: calls.append(a))
    assert torch.equal(again.second_moment(1), first)
    assert calls == [] and again.sources[1] == "cache (1500 tokens)"


def test_only_missing_layers_are_computed_in_one_pass(llama, tmp_path):
    make(llama, tmp_path, layers=(1,)).prepare()
    stats = make(llama, tmp_path, layers=(1, 3))
    stats.prepare()
    assert stats.sources == {1: "cache (1500 tokens)", 3: "computed (1500 tokens)"}
    assert len(StatsCache(tmp_path).entries()) == 2


def test_errors_name_the_problem(llama, tmp_path):
    stats = make(llama, tmp_path, layers=(1,))
    with pytest.raises(StatsError, match="layer 2 was not requested"):
        stats.second_moment(2)
    with pytest.raises(StatsError, match="out of range"):
        make(llama, tmp_path, layers=(9,))
    with pytest.raises(StatsError, match="context"):
        model, tok, facts, adapter = llama
        provider(model, tok, facts, adapter, StatsRequest(layers=(1,), tokens=10, max_len=4096))
    with pytest.raises(StatsError, match="does not exist"):
        make(llama, tmp_path, corpus=tmp_path / "missing.txt")


def test_dtype_mismatch_is_logged_and_keyed_by_the_real_dtype(llama, tmp_path, caplog):
    model, tok, facts, adapter = llama
    request = StatsRequest(layers=(0,), tokens=100, max_len=32, dtype="bfloat16")
    with caplog.at_level(logging.WARNING, logger="kmec"):
        provider(model, tok, facts, adapter, request, cache=StatsCache(tmp_path)).prepare()
    assert "runs in float32" in caplog.text
    assert StatsCache(tmp_path).entries()[0].key.dtype == "float32"


def test_interrupted_pass_resumes_from_its_checkpoint(llama, tmp_path):
    reference = make(llama, tmp_path / "a", pool_size=4).prepare()

    def interrupt(_msg, done, _total):
        if done >= 800:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make(llama, tmp_path / "b", pool_size=4, checkpoint_s=0, progress=interrupt).prepare()
    (ckpt,) = (tmp_path / "b" / "checkpoints").iterdir()
    starts = []
    resumed = make(llama, tmp_path / "b", pool_size=4, checkpoint_s=0,
                   progress=lambda _m, done, _t: starts.append(done))
    moments = resumed.prepare()
    assert starts[0] >= 600  # picked up where the checkpoint left off, not at 0
    assert not ckpt.exists()
    for layer in (1, 2):
        assert moments[layer].count == reference[layer].count == 1500
        torch.testing.assert_close(moments[layer].total(), reference[layer].total(),
                                   rtol=1e-12, atol=1e-9)


def test_other_corpus_other_entry(llama, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("Paris is the capital of France.\n\nBerlin is the capital of Germany.\n")
    a = make(llama, tmp_path / "c", layers=(1,)).second_moment(1)
    stats = make(llama, tmp_path / "c", layers=(1,), corpus=text)
    b = stats.second_moment(1)
    assert not torch.allclose(a, b)
    assert stats.count(1) == len(text.read_text().replace("\n\n", "").strip())
    assert stats.sources[1].startswith("computed")  # the corpus ran out: fewer than requested
    assert len(StatsCache(tmp_path / "c").entries()) == 2


@pytest.mark.slow
def test_real_model_one_pass_matches_per_layer_passes(real_model, tmp_path):
    """SmolLM2-135M: d_mlp 1536 keys of layers 2 and 4 in one pass = one pass per layer.

    fp32 products: the check is about the one-pass machinery, and the per-layer
    reference runs each window alone, so its keys differ from the batched
    pass's in the last fp32 bits, which bf16 rounding could turn into a
    whole bf16 step.
    """
    from kmec.models.hooks import Trace
    from kmec.stats.corpus import resolve_corpus, windows

    lm = real_model
    adapter = adapter_for(lm.facts.model_type)
    request = StatsRequest(layers=(2, 4), tokens=200, max_len=64, products="float32")
    stats = provider(lm.model, lm.tok, lm.facts, adapter, request, cache=StatsCache(tmp_path))
    for layer in (2, 4):
        total = torch.zeros(1536, 1536, dtype=torch.float64)
        for w in windows(resolve_corpus("default"), lm.tok, max_len=64, tokens=200):
            with torch.no_grad(), Trace(lm.model, adapter.site("mlp_out", layer),
                                        retain_input=True, stop=True) as t:
                lm.model(input_ids=torch.tensor([w.ids]))
            k = t.input[0, w.n_special:].double()
            total += k.T @ k
        c = stats.second_moment(layer)
        assert c.shape == (1536, 1536) and stats.count(layer) == 200
        torch.testing.assert_close(c.double(), total / 200, rtol=1e-4, atol=1e-5)


def test_cached_layers_tells_what_a_compile_would_find_without_the_weights(llama, tmp_path):
    """``kmec plan`` takes cached statistics off its estimate: the lookup must use the
    keys a compile's provider uses, and a bigger budget or another corpus is a miss."""
    from kmec.models.load import fingerprint_model
    from kmec.stats.engine import cached_layers

    model, tok, facts, adapter = llama
    facts = facts.model_copy(update={"fingerprint": fingerprint_model(model)})
    make((model, tok, facts, adapter), tmp_path, layers=(1,)).prepare()
    cache = StatsCache(tmp_path)
    request = StatsRequest(layers=(1, 2), tokens=1500, max_len=48)
    assert cached_layers(facts, tok, adapter, request, cache=cache) == (1,)
    assert cached_layers(facts, tok, adapter, request.model_copy(update={"tokens": 3000}),
                         cache=cache) == ()
    assert cached_layers(facts, tok, adapter, request.model_copy(update={"max_len": 40}),
                         cache=cache) == ()
    other = facts.model_copy(update={"fingerprint": "0" * 64})
    assert cached_layers(other, tok, adapter, request, cache=cache) == ()
    assert cached_layers(facts.model_copy(update={"fingerprint": ""}), tok, adapter, request,
                         cache=cache) == ()
