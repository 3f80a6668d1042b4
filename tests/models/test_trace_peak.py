"""``kmec trace`` names a peak layer only when the peak stands out of the noise
(:func:`kmec.models.trace.peak_test`), on synthetic curves of a 30-layer model."""

from __future__ import annotations

import doctest
import math
import random

import pytest

from kmec.models import trace as trace_module
from kmec.models.trace import NOISE_Z, TraceResult, peak_test
from kmec.planner.draft import example_facts

LAYERS = 30


def result(ie: list[float], kind: str = "mlp") -> TraceResult:
    """A trace whose IE at the subject's last token (position 0) is ``ie``."""
    return TraceResult(prompt="a b", subject="a", target=None, answer="x", answer_id=0,
                       tokens=("a", " b"), subject_first=0, subject_last=0, last=1, kind=kind,
                       window=10, samples=10, seed=0, noise_std=1.0, n_layers=len(ie),
                       positions=(0, 1), p_clean=1.0, p_corrupted=0.0,
                       p_restored=tuple((p, 0.0) for p in ie))


def flat(rng: random.Random, sd: float = 0.005) -> list[float]:
    return [0.03 + rng.gauss(0, sd) for _ in range(LAYERS)]


def hill(rng: random.Random, height: float = 0.13, sd: float = 0.005) -> list[float]:
    return [0.01 + height * math.exp(-((layer - 10) / 4) ** 2 / 2) + rng.gauss(0, sd)
            for layer in range(LAYERS)]


@pytest.mark.parametrize("prompts", [1, 5])
def test_flat_curves_with_noise_name_no_peak(prompts):
    rng = random.Random(0)
    tests = [peak_test([result(flat(rng)) for _ in range(prompts)]) for _ in range(50)]
    # the highest of 30 noisy layers is always somewhere: it must not count as a peak
    assert sum(t.stands_out for t in tests) <= 2
    # the noise unit is measured, not assumed: close to the noise put in (0.005 per prompt)
    noise = sum(t.noise for t in tests) / len(tests)
    assert 0.5 * 0.005 / prompts**0.5 < noise < 2 * 0.005


@pytest.mark.parametrize("prompts", [1, 5])
def test_a_clear_peak_is_named_at_its_layer(prompts):
    rng = random.Random(1)
    t = peak_test([result(hill(rng)) for _ in range(prompts)])
    assert t.stands_out and t.layer in (9, 10, 11) and t.height > NOISE_Z * t.noise


def test_prompts_that_disagree_make_a_peak_noise():
    """Two prompts whose peaks cancel in the mean: the spread across prompts is the noise."""
    up = [0.5 if layer == 12 else 0.0 for layer in range(LAYERS)]
    down = [-0.48 if layer == 12 else 0.0 for layer in range(LAYERS)]
    alone = peak_test([result(up)])
    both = peak_test([result(up), result(down)])
    assert alone.stands_out and alone.layer == 12
    assert not both.stands_out and both.noise == pytest.approx(0.49, abs=0.01)


def test_cli_says_flat_within_noise_and_names_no_layer(capsys):
    from kmec.cli.trace import _print_summary, _summary

    rng = random.Random(2)
    flat_mlp = [result(flat(rng)) for _ in range(3)]
    peaked_hidden = [result(hill(rng), kind="hidden") for _ in range(3)]
    summary = _summary(flat_mlp + peaked_hidden, ["mlp", "hidden"], LAYERS)
    assert summary["mlp"]["peak_test"]["flat"] and summary["mlp"]["peak_layers_past_layer0"]["flat"]
    assert not summary["hidden"]["peak_test"]["flat"]
    _print_summary(summary, example_facts(), 3)
    out = capsys.readouterr().out
    mlp = next(line for line in out.splitlines() if line.startswith("mean mlp IE"))
    hidden = next(line for line in out.splitlines() if line.startswith("mean hidden IE"))
    assert "flat within noise" in mlp and "no peak layer" in mlp and "peak layer " not in mlp
    assert "peak layer 10" in hidden or "peak layer 9" in hidden or "peak layer 11" in hidden


def test_report_pages_say_flat(tmp_path):
    from kmec.models.trace_render import html, markdown

    results = [result(flat(random.Random(3)))]
    assert "is flat within noise: no peak layer" in markdown(results, ["f.svg"], model="m",
                                                            peaks={"mlp": []}, curves_file=None)
    assert "peaks at layers 4, 5" in html(results, ["<svg/>"], model="m", peaks={"mlp": [4, 5]},
                                          curves_svg=None)


def test_doctests():
    assert doctest.testmod(trace_module, optionflags=doctest.ELLIPSIS).failed == 0
