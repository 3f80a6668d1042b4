"""Metrics and per-item scores on fixed logits (exact values)."""

from __future__ import annotations

import math

import pytest
import torch

from kmec.verify import metrics
from kmec.verify.scoring import ItemScore, score_logprobs

LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0],   # after the prompt
                       [0.0, 3.0, 0.0, 0.0]])   # after target token 0
Z0 = math.log(math.e ** 2 + math.e + 1 + math.e ** -1)
Z1 = math.log(math.e ** 3 + 3)


def scored(target, ref=None) -> ItemScore:
    return score_logprobs(LOGITS.log_softmax(-1), target, ref, topk=3)


def test_score_logprobs_exact():
    s = scored([0, 1])
    assert s.target_logprobs == pytest.approx((2 - Z0, 3 - Z1), abs=1e-6)
    assert s.target_hits == (True, True) and s.exact and s.token_accuracy == 1.0
    assert s.mean_logprob == pytest.approx((2 - Z0 + 3 - Z1) / 2, abs=1e-6)
    assert s.prob == pytest.approx(math.exp((2 - Z0 + 3 - Z1) / 2), abs=1e-6)
    assert s.top_ids == (0, 1, 2)
    assert s.top_probs == pytest.approx(tuple(math.exp(x - Z0) for x in (2, 1, 0)), abs=1e-6)
    assert s.kl == 0.0
    miss = scored([1, 0])
    assert miss.target_hits == (False, False) and miss.token_accuracy == 0.0 and not miss.exact
    half = scored([0, 2])
    assert half.token_accuracy == 0.5 and not half.exact


def test_kl_to_reference_exact():
    uniform = torch.zeros(4).log_softmax(-1)
    s = scored([0], ref=uniform)
    p = [math.exp(x - Z0) for x in (2, 1, 0, -1)]
    expected = sum(0.25 * (math.log(0.25) - math.log(pi)) for pi in p)
    assert s.kl == pytest.approx(expected, abs=1e-6)
    assert metrics.kl_divergence(uniform, LOGITS[0].log_softmax(-1)) == pytest.approx(expected)


def test_bare_prompt_has_no_target():
    s = scored([])
    assert s.target_ids == () and s.token_accuracy == 0.0 and not s.exact and s.top1 == 0


def test_probe_value_protocols():
    new, old = scored([0, 1]), scored([1, 0])
    assert metrics.probe_value(new, old, "prob") == 1.0
    assert metrics.probe_value(old, new, "prob") == 0.0
    # without an old target: the first target token must be the top-1 next token
    assert metrics.probe_value(new, None, "prob") == 1.0
    assert metrics.probe_value(old, None, "prob") == 0.0
    assert metrics.probe_value(scored([0, 2]), None, "token") == 0.5
    assert metrics.probe_value(scored([0, 2]), None, "greedy") == 0.0
    assert metrics.probe_value(new, None, "greedy") == 1.0
    with pytest.raises(ValueError):
        metrics.probe_value(new, None, "bleu")


def test_magnitude():
    new, old = scored([0, 1]), scored([1, 0])
    assert metrics.magnitude(new, old) == pytest.approx(new.prob - old.prob)
    assert metrics.magnitude(new) == pytest.approx(new.prob)


def _s(top1: int, kl: float) -> ItemScore:
    return ItemScore((), (), (), (top1, 9), (0.6, 0.1), kl)


def test_locality():
    base = _s(3, 0.0)
    assert metrics.agrees(base, _s(3, 0.5)) is True
    assert metrics.agrees(base, _s(3, 0.5), kl_budget=0.1) is False
    assert metrics.agrees(base, _s(4, 0.0)) is False
    assert metrics.locality([True, True, False, True]) == 0.75
    assert metrics.locality([]) == 0.0


def test_accuracy_family():
    assert metrics.accuracy([1.0, 0.0, 1.0, 1.0]) == 0.75
    assert metrics.generality([0.5, 1.0]) == 0.75
    assert metrics.portability([0.0, 1.0]) == 0.5
    assert metrics.reversal([1.0]) == 1.0


def test_retention_and_scalability():
    assert metrics.retention([1.0, 0.0, 1.0]) == pytest.approx(2 / 3)
    assert metrics.relative_retention([1.0, 0.0, 1.0], [1.0, 1.0, 0.0]) == 1.0
    assert metrics.relative_retention([0.0], [0.0]) is None
    assert metrics.scalability([1.0, 1.0, 0.0, 0.0]) == 0.5
    assert metrics.relative_scalability([1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]) == \
        pytest.approx(0.5 / 0.75)
    assert metrics.relative_scalability([1.0], [0.0]) is None


def test_perplexity_ratio():
    assert metrics.perplexity_ratio(10.0, 11.0) == pytest.approx(1.1)
    assert metrics.perplexity_ratio(0.0, 1.0) == float("inf")
