"""Causal tracing on tiny models (shapes, exactness checks, seeds, cache, CLI) and
one slow test on the real model."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch

from kmec.errors import KmecError
from kmec.models.adapters import adapter_for
from kmec.models.trace import (
    TraceResult,
    mean_ie,
    patched_probs,
    peak_layers,
    prepare_trace,
    restore_grid,
    subject_span,
    trace,
    trace_cached,
)
from kmec.models.trace_render import svg_curves, svg_heatmap
from tests.conftest import ByteTokenizer

PROMPT, SUBJECT = "The capital of France is", "France"
FIRST, LAST = PROMPT.index(SUBJECT), PROMPT.index(SUBJECT) + len(SUBJECT) - 1  # byte tokens
ATOL = 1e-6  # batched vs single-row matmuls may differ in the last bits


@pytest.fixture(scope="module")
def tok() -> ByteTokenizer:
    return ByteTokenizer()


def run(tiny_models, family, tok, **kw) -> TraceResult:
    model = tiny_models[family]
    return trace(model, tok, adapter_for(model.config.model_type), PROMPT, SUBJECT,
                 **{"samples": 3, **kw})


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_shapes_and_positions(tiny_models, tiny_family, tok, kind):
    r = run(tiny_models, tiny_family, tok, kind=kind)
    n_tok = len(PROMPT)
    assert (r.subject_first, r.subject_last, r.last) == (FIRST, LAST, n_tok - 1)
    assert r.positions == tuple(range(n_tok)) and len(r.tokens) == n_tok
    assert len(r.p_restored) == r.n_layers == 4
    assert all(len(row) == n_tok for row in r.p_restored)
    assert len(r.ie_subject_last) == len(r.ie_last) == 4
    assert r.window == (1 if kind == "hidden" else 10) and r.kind == kind
    assert 0 < r.p_clean < 1 and 0 < r.p_corrupted < 1


def test_answer_defaults_to_the_top_token_and_target_is_its_first_token(tiny_models, tok):
    model = tiny_models["llama"]
    with torch.no_grad():
        top = int(model(torch.tensor([tok.encode(PROMPT)])).logits[0, -1].argmax())
    assert run(tiny_models, "llama", tok).answer_id == top
    r = run(tiny_models, "llama", tok, target="Paris")
    assert r.answer_id == tok.encode(" Paris")[0] and r.target == "Paris"


def test_restoring_everything_gives_back_p_clean(tiny_models, tiny_family, tok):
    model = tiny_models[tiny_family]
    setup = prepare_trace(model, tok, adapter_for(model.config.model_type), PROMPT, SUBJECT,
                          samples=4, kind="hidden")
    shape = (setup.n_layers, setup.n_tokens)
    masks = torch.stack([torch.zeros(shape, dtype=torch.bool), torch.ones(shape, dtype=torch.bool)])
    probs = patched_probs(setup, masks)
    assert probs.shape == (2, 4)
    torch.testing.assert_close(probs[1], torch.full((4,), setup.p_clean), rtol=0, atol=ATOL)
    assert not torch.allclose(probs[0], probs[1], rtol=0, atol=ATOL)  # the noise does something


def test_last_layer_at_last_token_is_the_whole_effect(tiny_models, tiny_family, tok):
    r = run(tiny_models, tiny_family, tok)
    assert r.ie_last[-1] == pytest.approx(r.p_clean - r.p_corrupted, abs=ATOL)


def test_tokens_before_the_subject_carry_no_effect(tiny_models, tiny_family, tok):
    r = run(tiny_models, tiny_family, tok)
    for pos in range(FIRST):
        assert max(abs(x) for x in r.ie_at(pos)) < ATOL


def test_deterministic_with_a_seed(tiny_models, tok):
    a = run(tiny_models, "gpt2", tok, seed=7)
    assert a == run(tiny_models, "gpt2", tok, seed=7)
    assert a.p_corrupted != run(tiny_models, "gpt2", tok, seed=8).p_corrupted


def test_chunking_does_not_change_the_result(tiny_models, tok):
    a = run(tiny_models, "gpt_neox", tok, kind="mlp")
    b = run(tiny_models, "gpt_neox", tok, kind="mlp", batch_tokens=50)
    assert torch.allclose(torch.tensor(a.p_restored), torch.tensor(b.p_restored), atol=ATOL)


def test_key_positions_only(tiny_models, tok):
    r = run(tiny_models, "llama", tok, positions=())
    assert r.positions == (LAST, len(PROMPT) - 1)
    full = run(tiny_models, "llama", tok)
    assert r.ie_subject_last == pytest.approx(full.ie_subject_last, abs=ATOL)
    with pytest.raises(KmecError, match="not traced"):
        r.ie_at(0)


def test_noise_scale_is_three_embedding_stds(tiny_models, tok):
    model = tiny_models["gpt2"]
    r = run(tiny_models, "gpt2", tok)
    assert r.noise_std == pytest.approx(3 * float(model.transformer.wte.weight.std()))
    assert run(tiny_models, "gpt2", tok, noise=0.0).p_corrupted == pytest.approx(r.p_clean,
                                                                                 abs=ATOL)


def test_restore_grid_windows():
    g = restore_grid(4, 3, (0, 2), window=3)
    assert g.shape == (1 + 4 * 2, 4, 3) and not g[0].any()
    # centre layer 0 at position 2: window 3 covers layers 0..1
    assert g[1 + 0 * 2 + 1, :, 2].tolist() == [True, True, False, False]
    assert g[1 + 2 * 2 + 0, :, 0].tolist() == [False, True, True, True]
    assert int(g.sum()) == 2 * (2 + 3 + 3 + 2)


@pytest.mark.parametrize("kw, match", [
    ({"subject": "Spain"}, "does not occur"),
    ({"samples": 0}, "at least 1"),
    ({"kind": "ffn"}, "unknown trace kind"),
    ({"positions": (99,)}, "outside"),
    ({"window": 0}, "at least 1"),
])
def test_bad_inputs(tiny_models, tok, kw, match):
    model = tiny_models["gpt2"]
    subject = kw.pop("subject", SUBJECT)
    with pytest.raises(KmecError, match=match):
        trace(model, tok, adapter_for("gpt2"), PROMPT, subject, **kw)


def test_subject_span_multi_token(tok):
    assert subject_span(tok, PROMPT, "capital") == (4, 10)


def test_cache_hit(tiny_models, tok, tmp_path, monkeypatch):
    model = tiny_models["llama"]
    kw = {"fingerprint": "ab" * 32, "cache_dir": tmp_path, "samples": 2, "kind": "mlp"}
    first, hit = trace_cached(model, tok, adapter_for("llama"), PROMPT, SUBJECT, **kw)
    assert not hit
    files = list((tmp_path / ("ab" * 8)).glob("*.json"))
    assert len(files) == 1
    monkeypatch.setattr("kmec.models.trace.trace", lambda *a, **k: pytest.fail("not cached"))
    again, hit = trace_cached(model, tok, adapter_for("llama"), PROMPT, SUBJECT,
                              batch_tokens=64, window=10, seed=0, **kw)  # defaults spelled out
    assert hit and again == first
    monkeypatch.undo()
    _, hit = trace_cached(model, tok, adapter_for("llama"), PROMPT, SUBJECT,
                          **{**kw, "seed": 1})
    assert not hit and len(list((tmp_path / ("ab" * 8)).glob("*.json"))) == 2


def test_json_round_trip_and_summary(tiny_models, tok):
    r = run(tiny_models, "gptj", tok)
    assert TraceResult.model_validate_json(r.model_dump_json()) == r
    s = r.summary()
    assert s["ie_subject_last"] == list(r.ie_subject_last) and json.dumps(s)


def test_mean_ie_and_peak_layers(tiny_models, tok):
    rs = [run(tiny_models, "llama", tok, kind="mlp", seed=s) for s in (0, 1)]
    curve = mean_ie(rs)
    assert curve[2] == pytest.approx((rs[0].ie_subject_last[2] + rs[1].ie_subject_last[2]) / 2)
    peaks = peak_layers(rs)
    assert peaks == sorted(peaks) and max(curve) == pytest.approx(max(curve[i] for i in peaks))
    assert peak_layers(rs, min_layer=3) == [3]
    with pytest.raises(KmecError, match="outside"):
        peak_layers(rs, min_layer=4)
    with pytest.raises(KmecError, match="no attn traces"):
        peak_layers(rs, kind="attn")
    with pytest.raises(KmecError, match="different depths"):
        mean_ie([*rs, rs[0].model_copy(update={"n_layers": 5, "p_restored":
                                               rs[0].p_restored + rs[0].p_restored[:1]})])


def test_svgs_are_well_formed(tiny_models, tok):
    r = run(tiny_models, "gpt2", tok, kind="attn")
    root = ET.fromstring(svg_heatmap(r))
    rects = [e for e in root.iter() if e.tag.endswith("rect")]
    assert len(rects) >= r.n_layers * len(r.positions)
    ET.fromstring(svg_curves({"attn @ subject last": list(r.ie_subject_last),
                              "attn @ last": list(r.ie_last)}, title="<t> & more"))


# ---------------------------------------------------------------- CLI


@pytest.fixture()
def tiny_cli(tiny_models, monkeypatch, tmp_path):
    from kmec.models.facts import facts_from_config
    from kmec.models.load import LoadedModel, ModelRef

    model = tiny_models["llama"]
    facts = facts_from_config(model.config, name="tiny", fingerprint="cd" * 32)

    def load(ref, **_):
        return LoadedModel(model=model, tok=ByteTokenizer(), facts=facts,
                           ref=ModelRef(str(ref), "folder", None))

    monkeypatch.setattr("kmec.models.load.load_model", load)
    monkeypatch.setenv("KMEC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")


def cli(*args) -> int:
    from kmec.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


def test_cli_prompt_writes_out_dir_and_caches(tiny_cli, tmp_path, capsys):
    out = tmp_path / "out"
    args = ("trace", PROMPT, "--subject", SUBJECT, "--samples", "2", "--model", "tiny")
    assert cli(*args, "--out", str(out)) == 0
    printed = capsys.readouterr()
    assert "@ 'France'" in printed.out and "mlp w10" in printed.out
    assert "peak layer" in printed.out and "planner defaults for tiny" in printed.out
    names = sorted(p.name for p in out.iterdir() if p.name != ".kmec-output")
    assert names == ["00-the-capital-of-france-is-hidden.svg", "00-the-capital-of-france-is-mlp.svg",
                     "index.html", "index.md", "mean.svg", "traces.json"]
    data = json.loads((out / "traces.json").read_text())
    assert [r["kind"] for r in data["results"]] == ["hidden", "mlp"]
    assert set(data["summary"]) == {"hidden", "mlp"} and data["fingerprint"] == "cd" * 32
    assert data["summary"]["mlp"]["window"] == 10 and len(data["summary"]["mlp"]["mean_ie"]["last"]) == 4
    for svg in ("mean.svg", "00-the-capital-of-france-is-mlp.svg"):
        ET.fromstring((out / svg).read_text())
    assert (tmp_path / "home" / "trace" / ("cd" * 8)).is_dir()
    assert cli(*args) == 0
    assert "2 of 2 trace(s) came from the cache" in capsys.readouterr().err


def test_cli_spec_traces_each_edit_with_its_old_answer(tiny_cli, tmp_path, capsys):
    spec = tmp_path / "s.kmec"
    spec.write_text('relation capital {\n  prompt "The capital of {{ subject }} is"\n}\n'
                    'edit france {\n  subject "France" relation capital "Paris" -> "Lyon"\n}\n'
                    'edit spain {\n  subject "Spain" relation capital "Madrid" -> "Seville"\n}\n')
    assert cli("trace", str(spec), "--kind", "mlp", "--samples", "2", "--positions", "key",
               "--json") == 0
    data = json.loads(capsys.readouterr().out)
    got = [(r["prompt"], r["target"], r["answer"], r["positions"]) for r in data["results"]]
    assert got == [("The capital of France is", "Paris", " ", [20, 23]),
                   ("The capital of Spain is", "Madrid", " ", [19, 22])]


@pytest.mark.parametrize("args, message", [
    (("The capital of France is",), "--subject"),
    (("The capital of France is", "--subject", "France", "--kind", "mlp,ffn"), "--kind"),
    (("missing.kmec",), "does not exist"),
])
def test_cli_bad_input_exits_2(tiny_cli, capsys, args, message):
    assert cli("trace", *args) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_real_model_france_paris(real_model):
    from kmec.models.trace import trace as trace_fn

    torch.set_num_threads(1)
    lm = real_model
    r = trace_fn(lm.model, lm.tok, adapter_for(lm.facts.model_type), PROMPT, SUBJECT,
                 samples=3, positions=())
    assert r.answer == " Paris" and r.tokens[r.subject_last] == " France"
    assert r.p_clean > 0.5 and r.p_clean > r.p_corrupted + 0.3
    assert r.ie_last[-1] == pytest.approx(r.p_clean - r.p_corrupted, abs=1e-5)
    assert max(r.ie_subject_last[:10]) > 0.5 * (r.p_clean - r.p_corrupted)
