"""Devices, dtypes and device maps: checked before loading, recorded, fingerprints that
name the float32 weights whatever dtype loads them, and builds that say where they ran."""

from __future__ import annotations

import json

import pytest
import torch

from kmec.errors import ModelError
from kmec.models import load as L
from tests.conftest import build_tiny_model

CUDA = torch.cuda.is_available()


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KMEC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def tiny_folder(tmp_path, family: str = "llama"):
    """A tiny model saved as a Hugging Face folder with a one-token-per-character tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = build_tiny_model(family, seed=2)
    folder = tmp_path / f"tiny-{family}"
    model.save_pretrained(folder)
    vocab = {chr(32 + i): i for i in range(96)} | {"[UNK]": 96, "[PAD]": 97}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]") \
        .save_pretrained(folder)
    return model, folder


def test_devices_and_dtypes_are_checked_with_what_is_here():
    assert L.resolve_device(None) == "cpu" and L.resolve_device("CPU") == "cpu"
    assert L.resolve_device("auto") == ("cuda" if CUDA else "cpu")
    with pytest.raises(ModelError, match="unknown device 'tpu'") as e:
        L.resolve_device("tpu")
    assert "cpu" in (e.value.hint or "")
    assert L.resolve_dtype("bf16") == "bfloat16" and L.resolve_dtype("torch.float16") == "float16"
    with pytest.raises(ModelError, match="unknown dtype 'int8'") as e:
        L.resolve_dtype("int8")
    assert "bfloat16" in (e.value.hint or "")


@pytest.mark.skipif(CUDA, reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_says_so_and_names_the_devices_here():
    for asked in ("cuda", "cuda:1"):
        with pytest.raises(ModelError, match="CUDA is not available") as e:
            L.resolve_device(asked)
        assert "devices here: cpu" in (e.value.hint or "")
    with pytest.raises(ModelError, match="CUDA is not available"):
        L.parse_device_map({"model.layers.0": 0})


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_resolves_where_cuda_is():
    assert L.resolve_device("cuda") == "cuda"
    assert L.resolve_device("cuda:0") == "cuda:0"
    assert L.parse_device_map({"model.layers.0": 0}) == {"model.layers.0": "cuda:0"}


def test_device_maps_from_text_files_and_mappings(tmp_path):
    assert L.parse_device_map("auto") == "auto" and L.parse_device_map(None) is None
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"model.embed_tokens": "cpu", "lm_head": "cpu"}))
    assert L.parse_device_map(str(f)) == {"model.embed_tokens": "cpu", "lm_head": "cpu"}
    with pytest.raises(ModelError, match="not one of auto"):
        L.parse_device_map("everywhere")
    with pytest.raises(ModelError, match="offloaded to disk"):
        L.parse_device_map({"model.layers.0": "disk"})
    with pytest.raises(ModelError, match="cannot read the device map file"):
        L.parse_device_map(str(tmp_path / "missing.json"))


def test_runtime_json_round_trip_and_the_build_default_agree():
    from kmec.artifacts.build import DEFAULT_RUNTIME

    assert L.Runtime().to_json() == DEFAULT_RUNTIME
    r = L.Runtime("cuda:0", "bfloat16", {"model.layers.0": "cuda:0"})
    assert L.Runtime.from_json(r.to_json()) == r
    assert L.Runtime.from_json(None) == L.Runtime() and L.Runtime().is_default


def test_bf16_load_keeps_the_float32_fingerprint(home, tmp_path):
    """A bf16 load names the same weights as a float32 one (so a bf16 build verifies on a
    float32 load), and its loaded fingerprint is the bf16 weights' own."""
    model, folder = tiny_folder(tmp_path)
    lm16 = L.load_model(str(folder), dtype="bf16")  # first: no float32 fingerprint cached yet
    assert {p.dtype for p in lm16.model.parameters()} == {torch.bfloat16}
    lm32 = L.load_model(str(folder))
    assert lm16.facts.fingerprint == lm32.facts.fingerprint == L.fingerprint_model(model)
    assert lm16.loaded_fingerprint == L.fingerprint_model(lm16.model) != lm16.facts.fingerprint
    assert lm32.loaded_fingerprint == lm32.facts.fingerprint
    units = L.native_bf16("cpu")  # a fact of this machine, recorded with the runtime
    assert lm16.runtime == L.Runtime("cpu", "bfloat16", bf16_units=units)
    assert lm32.runtime == L.Runtime("cpu", bf16_units=units)
    assert lm16.facts.dtype == "bfloat16"


def test_device_map_load_records_the_map_and_matches_the_plain_load(home, tmp_path):
    _, folder = tiny_folder(tmp_path)
    dm = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(4)},
          "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    lm = L.load_model(str(folder), device_map=json.dumps(dm))
    plain = L.load_model(str(folder))
    assert lm.runtime.device_map is not None and set(lm.runtime.device_map.values()) == {"cpu"}
    assert lm.facts.fingerprint == plain.facts.fingerprint
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(lm.model(ids).logits, plain.model(ids).logits)
    with pytest.raises(ModelError, match="not both"):
        L.load_model(str(folder), device="cpu", device_map="auto")


def test_offloaded_weights_are_refused():
    model = build_tiny_model("gpt2")
    model.transformer.h[0].mlp.c_fc.weight = torch.nn.Parameter(
        torch.empty(model.transformer.h[0].mlp.c_fc.weight.shape, device="meta"))
    with pytest.raises(ModelError, match="offloaded by the device map"):
        L._check_resident(model)


def test_doctests_of_the_runtime_helpers():
    import doctest

    import kmec.artifacts.build
    import kmec.backends.keys

    for module in (L, kmec.artifacts.build):
        assert doctest.testmod(module).failed == 0
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(kmec.backends.keys._runtime_tag, globs=vars(kmec.backends.keys)):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


def test_step_cache_key_changes_with_the_runtime_and_keeps_the_default():
    from kmec._version import __version__
    from kmec.compile import _step_key
    from kmec.hashing import canonical_json, sha256_text
    from kmec.planner.model import Step

    step = Step(id="s01-rome", backend="rome", edits=())
    before = sha256_text(canonical_json({"step": step.model_dump(mode="json"), "base": "f",
                                         "kmec": __version__, "previous": "", "seed": 0}))
    assert _step_key(step, "f", "", 0) == before  # steps cached before runtimes: still found
    bf16 = _step_key(step, "f", "", 0, L.Runtime("cpu", "bfloat16").to_json())
    cuda = _step_key(step, "f", "", 0, L.Runtime("cuda", "float32").to_json())
    assert len({before, bf16, cuda}) == 3
    units = _step_key(step, "f", "", 0, L.Runtime("cpu", bf16_units=True).to_json())
    assert units not in {before, bf16, cuda}


def test_the_runtime_records_bf16_units_and_old_records_read_without_them():
    units = L.Runtime("cpu", bf16_units=True)
    assert not units.is_default and units.to_json()["bf16_units"] is True
    assert L.Runtime.from_json(units.to_json()) == units
    assert "bf16_units" not in L.Runtime().to_json()  # builds and keys from before stay valid
    assert L.Runtime.from_json({"device": "cpu", "dtype": "float32"}).is_default
    assert units.describe() == "cpu with bf16 units, float32"


def test_a_step_cached_on_a_machine_with_bf16_units_is_not_reused_on_one_without(
        monkeypatch, tmp_path):
    """compute "auto" runs the target-value loop in bf16 where the device multiplies it
    natively: the step cache (shareable between CI runners) keeps the two kinds apart."""
    import dataclasses

    import kmec.compile as compile_mod
    from tests.conftest import ByteTokenizer
    from tests.models.test_chat import _loaded, _plan

    monkeypatch.setenv("KMEC_HOME", str(tmp_path))
    ran: list[str] = []
    monkeypatch.setattr(compile_mod, "_run_step", lambda step, *a, **k: ran.append(step.id) or [])
    lm = _loaded(ByteTokenizer())
    for units in (False, True, True, False):
        lm = dataclasses.replace(lm, runtime=L.Runtime("cpu", bf16_units=units))
        compile_mod.execute(_plan(None), lm)
    assert len(ran) == 2  # once per kind of machine; the repeats come from the cache


def test_step_cache_key_follows_the_wording_rule_only_where_wordings_are_drawn(monkeypatch):
    """A step that draws wordings from the model is another result when the rule that
    draws them changes (kmec.backends.wordings.VERSION); a step that draws none keeps
    its key."""
    import kmec.compile as C
    from kmec.planner.model import Step

    drawn = Step(id="s01-rome", backend="rome", edits=(), params={"value": {"wordings": 3}})
    none = Step(id="s01-memit", backend="memit", edits=(), params={"value": {"steps": 25}})
    a, n = C._step_key(drawn, "f", "", 0), C._step_key(none, "f", "", 0)
    monkeypatch.setattr(C.wordings, "VERSION", C.wordings.VERSION + 1)
    assert C._step_key(drawn, "f", "", 0) != a
    assert C._step_key(none, "f", "", 0) == n
