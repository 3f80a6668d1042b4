"""Batched scoring: leading spaces, batching equals one-at-a-time, caching."""

from __future__ import annotations

import math

import pytest
import torch

from kmec.verify.decode import greedy_continuations, perplexity
from kmec.verify.scoring import Item, ScoreCache, encode_item, score_items, spaced
from tests.conftest import FAMILIES, ByteTokenizer, build_tiny_model

ITEMS = [Item("The capital of France is", "Paris"), Item("abc", None), Item("x", "yz"),
         Item("Water is made of hydrogen and", "oxygen"), Item("Q: 2+2? A: ", "4"),
         Item("hello world", None)]


def test_spaced():
    assert spaced("The capital of France is", "Paris") == " Paris"
    assert spaced("The capital of France is ", "Paris") == "Paris"
    assert spaced("x", " y") == " y"
    assert spaced("x", "") == ""


def test_target_is_scored_with_its_leading_space():
    tok = ByteTokenizer()
    enc = encode_item(tok, Item("The capital of France is", "Paris"))
    assert enc.target_ids == tuple(tok.encode(" Paris"))
    assert enc.n_prompt == len(tok.encode("The capital of France is"))
    assert list(enc.positions) == list(range(enc.n_prompt - 1, enc.n_prompt + 5))
    bare = encode_item(tok, Item("abc"))
    assert bare.target_ids == () and list(bare.positions) == [2]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_at_a_time(family):
    tok = ByteTokenizer()
    models = [build_tiny_model(family), build_tiny_model(family, seed=1)]
    batched = score_items(models, tok, ITEMS, max_batch_tokens=64)
    for item, b in zip(ITEMS, batched):
        (single,) = score_items(models, tok, [item])
        for m in range(2):
            assert b[m].target_ids == single[m].target_ids
            assert b[m].target_hits == single[m].target_hits
            assert b[m].top_ids == single[m].top_ids
            assert b[m].target_logprobs == pytest.approx(single[m].target_logprobs, abs=1e-4)
            assert b[m].top_probs == pytest.approx(single[m].top_probs, abs=1e-4)
            assert b[m].kl == pytest.approx(single[m].kl, abs=1e-4)
    assert all(b[0].kl == 0.0 for b in batched) and any(b[1].kl > 0 for b in batched)


def test_scores_match_a_plain_forward():
    tok = ByteTokenizer()
    model = build_tiny_model("gpt2")
    (s,) = score_items([model], tok, [Item("hello", "ab")])
    ids = tok("hello ab")["input_ids"]
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    want = [lp[4, ids[5]].item(), lp[5, ids[6]].item(), lp[6, ids[7]].item()]
    assert s[0].target_logprobs == pytest.approx(want, abs=1e-5)


def test_cache_scores_each_item_once():
    tok = ByteTokenizer()
    cache = ScoreCache([build_tiny_model("llama")], tok)
    cache.prefetch(ITEMS + ITEMS)
    assert cache.items_scored == len(ITEMS)
    for it in ITEMS:
        cache.get(it)
    assert cache.items_scored == len(ITEMS)
    cache.get(Item("new prompt"))
    assert cache.items_scored == len(ITEMS) + 1 and Item("new prompt") in cache


def test_greedy_batched_equals_single():
    tok = ByteTokenizer()
    model = build_tiny_model("llama")
    prompts = ["hello there", "The capital of", "a"]
    batched = greedy_continuations([model], tok, prompts, max_new_tokens=5)
    assert batched == [greedy_continuations([model], tok, [p], max_new_tokens=5)[0] for p in prompts]


def test_perplexity_matches_manual():
    tok = ByteTokenizer()
    model = build_tiny_model("gpt_neox")
    (ppl,) = perplexity([model], tok, ["some plain text"])
    ids = tok("some plain text")["input_ids"]
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    nll = -sum(lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)) / (len(ids) - 1)
    assert ppl == pytest.approx(math.exp(nll), rel=1e-5)


def test_prefixes_are_read_from_one_row():
    from kmec.verify.scoring import _rows

    tok = ByteTokenizer()
    items = [Item("The river"), Item("The river rises in a range"), Item("The river rises"),
             Item("The river", "rises"), Item("Other"), Item("The river rises")]
    rows = _rows([encode_item(tok, it) for it in items])
    assert sorted(len(r.reads) for r in rows) == [1, 5]
    models = [build_tiny_model("llama"), build_tiny_model("llama", seed=2)]
    batched = score_items(models, tok, items)
    for item, b in zip(items, batched):
        (single,) = score_items(models, tok, [item])
        for m in range(2):
            assert b[m].top_ids == single[m].top_ids
            assert b[m].target_logprobs == pytest.approx(single[m].target_logprobs, abs=1e-4)
            assert b[m].kl == pytest.approx(single[m].kl, abs=1e-4)


def test_head_groups_bound_the_logit_block(monkeypatch):
    from kmec.verify import scoring

    tok = ByteTokenizer()
    rows = scoring._rows([encode_item(tok, it) for it in ITEMS])
    groups = scoring._head_groups(rows, max_positions=4)
    assert sorted(r for g in groups for r in g) == list(range(len(rows)))
    assert all(len(g) == 1 or sum(len(rows[r].positions) for r in g) <= 4 for g in groups)
    models = [build_tiny_model("gpt2"), build_tiny_model("gpt2", seed=1)]
    whole = score_items(models, tok, ITEMS)
    monkeypatch.setattr(scoring, "_head_groups", lambda rows: [[r] for r in range(len(rows))])
    split = score_items(models, tok, ITEMS)
    for a, b in zip(whole, split):
        for m in range(2):
            assert a[m].target_logprobs == pytest.approx(b[m].target_logprobs, abs=1e-5)
            assert a[m].kl == pytest.approx(b[m].kl, abs=1e-6)
