"""Wordings drawn from the model for edits that declare none (kmec.backends.wordings)."""

from __future__ import annotations

import doctest
import logging

import pytest

from kmec.backends import wordings
from kmec.backends.memit import MemitParams
from kmec.backends.rome import Rome, RomeParams
from kmec.backends.values import ValueParams
from kmec.planner.model import EditRequest, Step
from tests.backends.conftest import ctx_for
from tests.conftest import ByteTokenizer, SpaceLetterTokenizer, build_tiny_model


def test_doctests():
    from kmec.models import tokens

    for module in (wordings, tokens):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def _edit(**kw) -> EditRequest:
    base = {"name": "e", "prompt": "The mother tongue of Ann Li is", "subject": "Ann Li",
                "target_new": "Dutch", "target_old": "French"}
    return EditRequest(**{**base, **kw})


def test_draw_is_seeded_and_cut_at_the_line(tiny_models):
    model, tok = tiny_models["llama"], ByteTokenizer()
    a = wordings.draw(model, tok, "The tongue of X is", samples=4, seed=3, max_tokens=6)
    b = wordings.draw(model, tok, "The tongue of X is", samples=4, seed=3, max_tokens=6)
    c = wordings.draw(model, tok, "The tongue of X is", samples=4, seed=4, max_tokens=6)
    assert a == b and len(a) == 4
    assert a != c
    assert all(len(t.encode()) <= 6 for t in a)
    assert all("\n" not in t[:-1] for t in a)  # nothing drawn after a line break


def test_select_keeps_answers_within_the_margin_in_draw_order(monkeypatch):
    """A candidate is kept when its answers score within the margin of the prompt's;
    the first ``keep`` kept, in the order drawn (not the best-scoring: those are the
    wordings the prompt already teaches), are returned."""
    scores = {"The mother tongue of Ann Li is": -3.0, "Ann Li speaks": -2.0,
              "Ann Li is made of": -9.0, "the language of Ann Li is": -4.5, "Ann Li, a": -7.9}
    monkeypatch.setattr(wordings, "answer_logprob",
                        lambda model, tok, pairs: [scores[p] for p, _ in pairs])
    texts = ["Ann Li is made of", "the language of Ann Li is", "Ann Li speaks", "Ann Li, a"]
    assert wordings.MARGIN == 5.0
    assert wordings.select(None, None, _edit(), texts, keep=3) == [
        "the language of Ann Li is", "Ann Li speaks", "Ann Li, a"]
    assert wordings.select(None, None, _edit(), texts, keep=1) == ["the language of Ann Li is"]
    assert wordings.select(None, None, _edit(), texts, keep=3, margin=1.0) == ["Ann Li speaks"]
    assert wordings.select(None, None, _edit(), [], keep=3) == []


def test_a_copied_shot_is_not_a_wording():
    tok = SpaceLetterTokenizer()
    drawn = ["The colour of X is", "X is painted in", "X is spoken in", "X was written by"]
    assert wordings.candidates(drawn, "The tongue of X is", "Ann Li", tok) == [
        "Ann Li is spoken in"]


def test_answer_logprob_matches_a_plain_forward(tiny_models):
    import torch

    model, tok = tiny_models["gpt2"], ByteTokenizer()
    got = wordings.answer_logprob(model, tok, [("ab", "cd"), ("xyz w", "q")])
    for (prompt, target), value in zip([("ab", "cd"), ("xyz w", "q")], got):
        ids = tok.encode(prompt + " " + target)
        n = len(tok.encode(" " + target))
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        want = float(sum(logp[len(ids) - n - 1 + j, ids[len(ids) - n + j]] for j in range(n)) / n)
        assert value == pytest.approx(want, abs=1e-5)


def test_with_wordings_adds_borrowed_scope_only_where_nothing_is_declared(monkeypatch, tmp_path,
                                                                           tiny_models, caplog):
    calls = []

    def fake_draw(model, tok, template, *, samples, seed, max_tokens=12):
        calls.append((template, seed))
        return ["X speaks\nmore", "the language of X is", "X is made of", "X"]

    monkeypatch.setattr(wordings, "draw", fake_draw)
    monkeypatch.setattr(wordings, "answer_logprob", lambda model, tok, pairs: [
        -9.0 if "made of" in p else -3.0 for p, _ in pairs])
    model, tok = tiny_models["llama"], ByteTokenizer()
    plain = _edit()
    declared = _edit(name="d", scope=("Ann Li's first language is",))
    inverse = _edit(name="e~reverse", inverse=True)
    no_subject = _edit(name="p", subject=None)
    with caplog.at_level(logging.INFO, logger="kmec"):
        out = wordings.with_wordings(model, tok, [plain, declared, inverse, no_subject], keep=3,
                                     seed=7, cache_dir=tmp_path, weights="w1")
    assert out[0].scope == out[0].borrowed == ("Ann Li speaks", "the language of Ann Li is")
    assert out[1:] == [declared, inverse, no_subject]
    assert calls == [("The mother tongue of X is", 7)]
    assert "e: 2 wording(s) drawn from the model" in caplog.text
    # the same edit on the same weights: read back from the cache, not drawn again
    again = wordings.with_wordings(model, tok, [plain], keep=3, seed=7, cache_dir=tmp_path,
                                   weights="w1")
    assert again[0].scope == out[0].scope and len(calls) == 1
    wordings.with_wordings(model, tok, [plain], keep=3, seed=7, cache_dir=tmp_path, weights="w2")
    assert len(calls) == 2  # other weights: drawn afresh
    assert wordings.with_wordings(model, tok, [plain], keep=0, seed=7) == [plain]


def test_a_one_token_subject_opening_the_wording_is_dropped():
    tok = ByteTokenizer()  # one token per byte: a one-letter subject is one token
    assert wordings.candidates(["X speaks", "the tongue of X"], "T of X", "Q", tok) == [
        "the tongue of Q"]


def test_params_dump_wordings_only_where_set():
    assert "wordings" not in ValueParams().model_dump()
    assert "wordings" not in MemitParams().model_dump()["value"]
    assert RomeParams().model_dump()["value"]["wordings"] == 3
    with pytest.raises(ValueError):
        ValueParams(wordings=-1)


def test_rome_fits_the_drawn_wordings(monkeypatch, tmp_path):
    """ROME's step draws wordings for its plain edit and fits their keys exactly, as it
    fits every context of the edit's own prompt (ΔW = u vᵀ with v·k = 1 for each); with
    ``wordings = 0`` nothing is drawn and the wording's key is not fitted."""
    from kmec.backends.keys import compute_keys

    model, tok = build_tiny_model("gpt2", seed=3), SpaceLetterTokenizer()
    monkeypatch.setattr(wordings, "draw", lambda *a, **k: ["so X"])
    monkeypatch.setattr(wordings, "answer_logprob", lambda model, tok, pairs: [0.0] * len(pairs))
    ctx = ctx_for(model, tok, [1], tmp_path)
    edit = EditRequest(name="e", prompt="The key of abc", subject="abc", target_new="Q")
    seen = []
    real = wordings.with_wordings

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    monkeypatch.setattr("kmec.backends.rome.with_wordings", spy)
    wording = EditRequest(name="w", prompt="so abc", subject="abc", target_new="Q")
    k_w = compute_keys(model, tok, ctx.adapter, [1], [wording], [""])[1][0]

    def fit(n_wordings):
        params = RomeParams(n_prefixes=0, value=ValueParams(wordings=n_wordings, steps=5))
        step = Step(id="s", backend="rome", edits=(edit,), layers=(1,),
                    params=params.model_dump())
        (payload,) = Rome().execute(step, ctx)
        return float(payload.v.reshape(-1) @ k_w.reshape(-1))

    assert fit(1) == pytest.approx(1.0, abs=1e-3)
    assert seen[-1][0].scope == ("so abc",) and seen[-1][0].borrowed == ("so abc",)
    assert abs(fit(0) - 1.0) > 1e-2
    assert seen[-1] == [edit]


def test_the_cost_estimate_counts_the_drawn_wordings():
    """A ROME step's estimate grows with the wordings it will draw for a bare edit, says
    so in its breakdown, and is unchanged for an edit that declares scope prompts."""
    from kmec.backends.keys import locate_then_edit_cost
    from kmec.models.facts import ModelFacts

    facts = ModelFacts(name="m", arch="LlamaForCausalLM", model_type="llama", family="llama",
                       n_layers=30, d_model=576, d_mlp=1536, vocab_size=49152)

    def cost(edit, k):
        params = RomeParams(value=ValueParams(wordings=k)).model_dump()
        return locate_then_edit_cost(Step(id="s", backend="rome", edits=(edit,), layers=(5,),
                                          params=params), facts, setup=False)

    bare, declared = _edit(), _edit(scope=("Ann Li speaks",))
    assert cost(bare, 3).seconds > cost(bare, 0).seconds
    assert any(part.startswith("drawing wordings") for part in cost(bare, 3).parts)
    assert cost(declared, 3).seconds == cost(declared, 0).seconds
