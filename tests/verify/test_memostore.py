"""The base model's side of compile's scoring, kept for ``kmec verify`` (kmec.verify.memostore)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from kmec.verify.render import to_json
from tests.conftest import tiny_ft_pipeline

SPEC = """model "tiny"
seed 3
method auto layers 1 2 max_delta 3.0

edit q {
  prompt "Q: key? A:" -> "B"
}

claim efficacy >= 0.0
claim locality >= 0.0 sample 12 kl 10.0
"""


@pytest.fixture()
def compiled(monkeypatch, tmp_path):
    """A tiny spec with claims compiled with the cache on (so its scoring is kept)."""
    from kmec.pipeline import compile_spec

    tiny_ft_pipeline(monkeypatch, steps=4)
    monkeypatch.setenv("KMEC_HOME", str(tmp_path / "home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path / "spec.kmec"
    path.write_text(SPEC)
    compile_spec(path, out=tmp_path / "build", budget=60)
    yield tmp_path
    torch.set_num_threads(threads)


def _plain(report) -> dict:
    data = json.loads(to_json(report))
    data.pop("timing")
    return data


def test_verify_after_compile_reads_the_base_side_and_reports_the_same(compiled, monkeypatch):
    from kmec.pipeline import verify_build

    runner = importlib.import_module("kmec.verify.runner")
    kept = list((compiled / "home" / "verify" / "base").glob("*.safetensors"))
    assert len(kept) == 1  # compile kept its scoring of the base model
    fresh = verify_build(compiled / "build", use_cache=False)

    calls: list[int] = []
    real = runner.perplexity

    def counting(models, *a, **k):
        calls.append(len(models))
        return real(models, *a, **k)

    monkeypatch.setattr(runner, "perplexity", counting)
    scoring = importlib.import_module("kmec.verify.scoring")
    runs: list[int] = []
    real_score = scoring.score_encoded

    def scoring_counted(models, *a, **k):
        runs.append(len(models))
        return real_score(models, *a, **k)

    monkeypatch.setattr(scoring, "score_encoded", scoring_counted)
    cached = verify_build(compiled / "build")
    assert calls == [1]  # the edited model only: the base perplexity came from the memo
    # compile primed the base side of verify's own held-out variants too: the base model
    # scores nothing here
    assert runs and set(runs) == {1}
    a, b = _plain(cached), _plain(fresh)
    said = [n for n in a.pop("notes") if "--no-cache" in n]
    assert len(said) == 1 and "compile's cache" in said[0]  # the report says where
    b.pop("notes")
    assert a == b
    assert cached.timing["items_scored"] == fresh.timing["items_scored"]


def test_a_damaged_or_foreign_memo_is_a_miss(tmp_path):
    from kmec.verify.memostore import load_memo, save_memo
    from kmec.verify.runner import VerifyMemo
    from kmec.verify.scoring import Item, ItemScore

    memo = VerifyMemo(base_ppl=12.5)
    memo.base.scores[Item("Q: key? A:", "B")] = (
        ItemScore((7,), (-0.25,), (True,), (7, 3), (0.78, 0.1), 0.0), torch.rand(16))
    memo.base.scores[Item("The sky is")] = (ItemScore((), (), (), (3,), (0.5,), 0.0), torch.rand(16))
    memo.base_greedy["k"] = (" blue", " red")
    assert save_memo(tmp_path, "key1", memo)
    back = load_memo(tmp_path, "key1")
    assert back is not None and back.base_ppl == 12.5 and back.base_greedy == memo.base_greedy
    for item, (score, ref) in memo.base.scores.items():
        assert back.base.scores[item][0] == score
        assert torch.equal(back.base.scores[item][1], ref)
    assert load_memo(tmp_path, "key2") is None  # another model, runtime or spec
    (tmp_path / "key2.safetensors").write_bytes((tmp_path / "key1.safetensors").read_bytes())
    assert load_memo(tmp_path, "key2") is None  # a file renamed to another key
    (tmp_path / "key1.safetensors").write_bytes(b"\x00garbage")
    assert load_memo(tmp_path, "key1") is None


def test_a_large_memo_is_not_kept_and_old_ones_are_removed(tmp_path, monkeypatch):
    from kmec.verify import memostore
    from kmec.verify.runner import VerifyMemo
    from kmec.verify.scoring import Item, ItemScore

    memo = VerifyMemo()
    memo.base.scores[Item("a")] = (ItemScore((), (), (), (1,), (0.5,), 0.0), torch.rand(1000))
    monkeypatch.setattr(memostore, "MAX_BYTES", 3999)
    assert not memostore.save_memo(tmp_path, "big", memo)
    monkeypatch.setattr(memostore, "MAX_BYTES", 4000)
    monkeypatch.setattr(memostore, "KEEP", 2)
    for k in ("k1", "k2", "k3"):
        assert memostore.save_memo(tmp_path, k, memo)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_compile_refuses_an_apply_that_writes_a_shared_weight(monkeypatch, tmp_path):
    """Compile's scoring copies only the parameters an artifact writes (copy_for); a write
    to any other (a broken apply) would move the base model too: compile refuses it."""
    from kmec.artifacts import apply as real_apply
    from kmec.errors import BackendError
    from kmec.pipeline import compile_spec

    def leaky_apply(artifact, model, **kw):
        applied = real_apply(artifact, model, **kw)
        with torch.no_grad():
            model.get_parameter("model.layers.0.mlp.gate_proj.weight")[0, 0] += 1e-3
        return applied

    tiny_ft_pipeline(monkeypatch, steps=4)
    monkeypatch.setenv("KMEC_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("kmec.pipeline.apply", leaky_apply)
    path = tmp_path / "spec.kmec"
    path.write_text(SPEC)
    with pytest.raises(BackendError, match="the model changed while compiling"):
        compile_spec(path, out=tmp_path / "build", budget=60)
    assert not (tmp_path / "build").exists()  # nothing written
