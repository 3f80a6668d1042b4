"""The target-value cache: chunks of δ reused only when everything they depend on matches."""

from __future__ import annotations

import logging

import pytest
import torch

from kmec.backends import get_backend, values
from kmec.backends.values import (
    ValueCache,
    ValueParams,
    chunk_bounds,
    optimise_deltas,
    value_cache,
)
from kmec.models.adapters import adapter_for
from kmec.planner.model import EditRequest, Step
from tests.backends.conftest import ctx_for
from tests.conftest import SpaceLetterTokenizer, build_tiny_model

EDITS = [EditRequest(name=f"e{i}", prompt=p, subject=s, target_new=t)
         for i, (p, s, t) in enumerate([("The key of abc", "abc", "Q"),
                                        ("A door of xyz", "xyz", "RS"),
                                        ("The colour of mnop", "mnop", "T"),
                                        ("The shape of uvw", "uvw", "Q")])]
PREFIXES = ("", "One two. ")
PARAMS = ValueParams(steps=6, weight_decay=0.0, clamp=1e4, edit_batch=2)


@pytest.fixture(scope="module")
def setup():
    model = build_tiny_model("llama", seed=3)
    return model, SpaceLetterTokenizer(), adapter_for(model.config.model_type)


class Counting:
    """Counts the chunks actually optimised (cache misses)."""

    def __init__(self, monkeypatch):
        self.chunks: list[int] = []
        real = values._optimise_chunk

        def spy(model, run, dtype, tok, adapter, layer, edits, *rest):
            self.chunks.append(len(edits))
            return real(model, run, dtype, tok, adapter, layer, edits, *rest)

        monkeypatch.setattr(values, "_optimise_chunk", spy)


def run(setup, edits, cache, params=PARAMS, layer=1):
    model, tok, adapter = setup
    return optimise_deltas(model, tok, adapter, layer, edits, PREFIXES, params, cache=cache)


def test_a_hit_returns_the_bytes_of_a_recomputation(setup, tmp_path, monkeypatch):
    fresh, p_fresh = run(setup, EDITS, None)
    cache = ValueCache(tmp_path, "w0")
    counting = Counting(monkeypatch)
    first, _ = run(setup, EDITS, cache)
    again, p_again = run(setup, EDITS, cache)
    assert sum(counting.chunks) == len(EDITS)  # the second run optimised nothing
    assert torch.equal(first, fresh) and torch.equal(again, fresh) and torch.equal(p_again, p_fresh)
    n_chunks = len(chunk_bounds(EDITS, PARAMS.edit_batch))
    assert len(list((tmp_path / "values").iterdir())) == n_chunks  # one file per chunk


def test_appending_edits_reoptimises_only_the_new_ones(setup, tmp_path, monkeypatch):
    cache = ValueCache(tmp_path, "w0")
    run(setup, EDITS[:2], cache)
    counting = Counting(monkeypatch)
    d, _ = run(setup, EDITS, cache)
    assert sum(counting.chunks) == 2
    assert torch.equal(d, run(setup, EDITS, None)[0])


@pytest.mark.parametrize(("change", "redone"), [("weights", 2), ("layer", 2), ("params", 2),
                                                ("prefixes", 2), ("edit", 1), ("scope", 1)])
def test_any_input_change_misses(setup, tmp_path, monkeypatch, change, redone):
    model, tok, adapter = setup
    run(setup, EDITS[:2], ValueCache(tmp_path, "w0"))
    counting = Counting(monkeypatch)
    cache, layer, params, edits, prefixes = ValueCache(tmp_path, "w0"), 1, PARAMS, EDITS[:2], PREFIXES
    if change == "weights":
        cache = ValueCache(tmp_path, "w1")
    elif change == "layer":
        layer = 0
    elif change == "params":
        params = PARAMS.model_copy(update={"kl_weight": 0.5})
    elif change == "edit":  # edits are chunks of one here: the other edit is reused
        edits = [EDITS[0], EDITS[1].model_copy(update={"target_new": "RT"})]
    elif change == "scope":  # a declared scope prompt is in the δ objective
        edits = [EDITS[0], EDITS[1].model_copy(update={"scope": ("xyz door",)})]
    else:
        prefixes = ("", "Three. ")
    optimise_deltas(model, tok, adapter, layer, edits, prefixes, params, cache=cache)
    assert sum(counting.chunks) == redone


def test_edit_names_and_the_chunk_size_setting_are_not_inputs(setup, tmp_path, monkeypatch):
    cache = ValueCache(tmp_path, "w0")
    run(setup, EDITS[:2], cache)
    counting = Counting(monkeypatch)
    renamed = [e.model_copy(update={"name": e.name + "x"}) for e in EDITS[:2]]
    # edit_batch 3 cuts the same chunks (of one edit) as 2: same keys
    run(setup, renamed, cache, params=PARAMS.model_copy(update={"edit_batch": 3}))
    assert counting.chunks == []


def test_an_insertion_changes_only_the_chunks_around_it(setup, tmp_path, monkeypatch):
    """Content-defined chunks: an edit inserted mid-spec does not shift the later chunks."""
    names = [f"{a}{b}" for a in "abcdefgh" for b in "xyz"]  # 24 subjects
    edits = [EditRequest(name=n, prompt=f"The key of {n}", subject=n, target_new="Q")
             for n in names]
    params = PARAMS.model_copy(update={"edit_batch": 4, "steps": 2})
    old = chunk_bounds(edits, 4)
    assert len(old) >= 4
    cache = ValueCache(tmp_path, "w0")
    model, tok, adapter = setup
    optimise_deltas(model, tok, adapter, 1, edits, PREFIXES, params, cache=cache)
    new_edit = EditRequest(name="new", prompt="The key of qq", subject="qq", target_new="Q")
    edited = [*edits[:12], new_edit, *edits[12:]]
    counting = Counting(monkeypatch)
    optimise_deltas(model, tok, adapter, 1, edited, PREFIXES, params, cache=cache)
    around = [s for s in old if s.start <= 12 <= s.stop]
    assert sum(counting.chunks) <= 1 + sum(s.stop - s.start for s in around) + 2 * 4
    assert sum(counting.chunks) < len(edited) // 2  # fixed-size chunks: every edit after 12
    shifted = {(s.start + 1, s.stop + 1) for s in old if s.start > 12}
    assert shifted & {(s.start, s.stop) for s in chunk_bounds(edited, 4)}


def test_an_unreadable_entry_is_recomputed(setup, tmp_path, monkeypatch, caplog):
    cache = ValueCache(tmp_path, "w0")
    good, _ = run(setup, EDITS[:1], cache)
    (entry,) = (tmp_path / "values").iterdir()
    entry.write_bytes(b"not a safetensors file")
    counting = Counting(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="kmec"):
        d, _ = run(setup, EDITS[:1], cache)
    assert counting.chunks == [1] and torch.equal(d, good)
    assert "ignoring an unreadable cached value" in caplog.text
    counting.chunks.clear()
    run(setup, EDITS[:1], cache)  # rewritten, readable again
    assert counting.chunks == []


def test_no_cache_without_a_folder_or_weights(tmp_path):
    assert value_cache(None, "w0") is None and value_cache(tmp_path, "") is None
    assert value_cache(tmp_path, "w0") == ValueCache(tmp_path, "w0")


def test_memit_with_another_lambda_reuses_the_targets(tmp_path, monkeypatch):
    """What the cache is for: re-solving a batch with new λ/layers costs no δ optimisation."""
    model = build_tiny_model("llama", seed=3)
    tok = SpaceLetterTokenizer()
    ctx = ctx_for(model, tok, [0, 1], tmp_path)
    ctx.weights = "base"
    memit = get_backend("memit")

    def step(lam, layers):
        return Step(id="s01-memit", backend="memit", edits=tuple(EDITS[:2]), layers=layers,
                    params={"lambda_rel": lam, "value": {"steps": 6, "weight_decay": 0.0,
                                                         "clamp": 1e4}})

    first = memit.execute(step(1.0, (0, 1)), ctx)
    counting = Counting(monkeypatch)
    other = memit.execute(step(0.25, (0, 1)), ctx)
    lower = memit.execute(step(1.0, (1,)), ctx)
    assert counting.chunks == []
    assert not torch.equal(first[-1].v, other[-1].v)  # a different solve from the same targets
    assert len(lower) == 1
    ctx.weights = ""  # unknown weights: nothing is reused
    memit.execute(step(1.0, (0, 1)), ctx)
    assert sum(counting.chunks) == 2


def test_a_scope_boost_reoptimises_only_the_chunks_of_the_boosted_edits(setup, tmp_path,
                                                                       monkeypatch):
    """The `broaden` repair boosts a few edits' scope weight: the other chunks are reused,
    and a boosted edit's δ is the one its scope weight times the boost gives."""
    edits = [e.model_copy(update={"scope": (f"{e.subject} then",)}) for e in EDITS[:2]]
    cache = ValueCache(tmp_path, "w0")
    run(setup, edits, cache)
    counting = Counting(monkeypatch)
    boosted = PARAMS.model_copy(update={"scope_boost": {"e1": 4.0}})
    d, _ = run(setup, edits, cache, params=boosted)
    assert counting.chunks == [1]  # e1's chunk alone
    alone, _ = run(setup, edits[1:], None, params=PARAMS.model_copy(update={"scope_weight": 4.0}))
    assert torch.allclose(d[1], alone[0], atol=1e-6)
    assert not torch.allclose(d[1], run(setup, edits, None)[0][1], atol=1e-4)
    assert "scope_boost" not in PARAMS.model_dump()  # plans without a boost keep their bytes
