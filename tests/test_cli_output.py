"""CLI output in CI logs: tables print in full off a terminal, and every command has ``--json``.

Each command runs in-process (``kmec.cli.main``) with stdout captured, so stdout
is not a terminal, as in a pipe or a CI log. A cut cell would end in ``…``;
with ``--json`` stdout must be one JSON document and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kmec.cli import main
from tests.conftest import (
    ByteTokenizer,
    SpaceLetterTokenizer,
    artifact_for,
    build_tiny_model,
    rank_one,
)

# Commands where --json makes no sense, each with its reason (keep this short).
NO_JSON = {"schema": "its one output is a JSON document already"}

LONG = "a-subject-name-long-enough-to-be-cut-at-eighty-columns"


def cli(*args) -> int:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


@pytest.fixture(autouse=True)
def _pipe_like(monkeypatch, tmp_path):
    """No COLUMNS (a CI runner sets none), a private model cache, one torch thread."""
    for name in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KMEC_HOME", str(tmp_path / "home" / LONG))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def whole(out: str, *names: str) -> None:
    """Nothing is cut short, and each of ``names`` appears in full."""
    assert "…" not in out, out
    for name in names:
        assert name in out, (name, out)


# ---------------------------------------------------------------- --json everywhere


def commands() -> list[tuple[str, object]]:
    """Every registered command as ("model list", click command), walking the groups."""
    import typer.main

    from kmec.cli import _load_commands, app

    _load_commands()
    found = []

    def walk(cmd: object, path: tuple[str, ...]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, (*path, name))
        else:
            found.append((" ".join(path), cmd))

    walk(typer.main.get_command(app), ())
    return found


def test_every_command_has_a_json_option():
    names = [name for name, _ in commands()]
    assert {"compile", "apply", "revert", "audit", "model list", "verify"} <= set(names)
    missing = [name for name, cmd in commands() if name not in NO_JSON
               and not any("--json" in getattr(p, "opts", ()) for p in cmd.params)]
    assert missing == []
    assert set(NO_JSON) <= set(names)  # no stale exemption


def test_model_list_json_and_table(capsys):
    assert cli("model", "list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["alias"] for r in rows} >= {"smollm2-135m"}
    assert all(r["installed"] is False and LONG in r["path"] for r in rows)
    assert cli("model", "list") == 0
    whole(capsys.readouterr().out, "kmec model install smollm2-135m")


def test_model_install_and_editors_json(capsys):
    from kmec.models.load import MODEL_META, alias_dir

    folder = alias_dir("smollm2-135m")  # an installed alias, as far as the cache tells
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"0" * 10)
    (folder / MODEL_META).write_text(json.dumps({"fingerprint": "ab" * 32,
                                                 "files": {"model.safetensors": 10}}))
    assert cli("model", "install", "smollm2-135m", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {
        "alias": "smollm2-135m", "path": str(folder), "fingerprint": "ab" * 32}
    assert cli("editors", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


# ---------------------------------------------------------------- apply, revert, audit


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved as a folder and a build directory declaring a rank-one edit."""
    from kmec.artifacts import save_artifact

    root = tmp_path_factory.mktemp("cli-output")
    model = build_tiny_model("llama", seed=3)
    model.save_pretrained(root / "base")
    art = artifact_for(model, [rank_one(model, layer=2)], base_model=str(root / "base"))
    save_artifact(art, root / "build" / "artifact")
    return root, art


def test_apply_revert_audit_print_json(saved, tmp_path, capsys):
    root, art = saved
    (param,) = art.manifest.params
    assert cli("apply", root / "build", "-o", tmp_path / "edited", "--json") == 0
    applied = json.loads(capsys.readouterr().out)
    assert applied["params"] == [param] and applied["payloads"] == 1
    assert applied["base_fingerprint"] == art.manifest.base_fingerprint
    assert applied["out"] == str(tmp_path / "edited") and applied["tokenizer"] == "none"

    assert cli("audit", tmp_path / "edited", "--base", root / "base", "--build", root / "build",
               "--json") == 0
    audited = json.loads(capsys.readouterr().out)
    assert audited["ok"] is True and audited["declared"] == [param]
    assert audited["undeclared"] == [] and audited["summary"].startswith("audit passed")

    assert cli("revert", tmp_path / "edited", "-o", tmp_path / "back", "--json") == 0
    reverted = json.loads(capsys.readouterr().out)
    assert reverted == {"out": str(tmp_path / "back"), "params": [param],
                        "base_fingerprint": art.manifest.base_fingerprint}

    # an audit that fails (the base itself: the declared parameter did not move) prints
    # its JSON too, and exits 1
    assert cli("audit", root / "base", "--base", root / "base", "--build", root / "build",
               "--json") == 1
    audited = json.loads(capsys.readouterr().out)
    assert audited["ok"] is False and audited["mismatched"] == [param]


# ---------------------------------------------------------------- tables off a terminal


def test_plan_table_and_tree_print_in_full(tmp_path, capsys):
    from kmec.planner.model import EditRequest, Plan, Step

    edits = tuple(EditRequest(name=f"{LONG}-{i}", prompt=f"The capital of {LONG} is",
                              subject=LONG, target_new="Paris") for i in range(3))
    step = Step(id=f"s01-rome-{LONG}", backend="rome", edits=edits, layers=(1,),
                writes=("model.layers.1.mlp.down_proj.weight",))
    plan = Plan(kmec_version="0.1.0", spec_hash="s" * 64, model=f"/models/{LONG}",
                model_fingerprint="f" * 64, model_arch="LlamaForCausalLM", seed=0,
                order="batch", steps=(step,))
    build = tmp_path / "build"
    build.mkdir()
    (build / "plan.json").write_text(plan.to_json())
    assert cli("plan", build) == 0
    whole(capsys.readouterr().out, f"s01-rome-{LONG}")
    assert cli("plan", build, "--explain") == 0
    whole(capsys.readouterr().out, f"s01-rome-{LONG}", f"{LONG}-2")


@pytest.fixture()
def tiny_loaded(monkeypatch):
    """``load_model`` gives a tiny Llama (with a byte tokenizer) whatever the reference."""
    from kmec.models.facts import facts_from_config
    from kmec.models.load import LoadedModel, ModelRef, fingerprint_model

    model = build_tiny_model("llama", seed=4)
    facts = facts_from_config(model.config, name=LONG, fingerprint=fingerprint_model(model))

    def load(ref, **_):
        return LoadedModel(model=model, tok=ByteTokenizer(), facts=facts,
                           ref=ModelRef(str(ref), "folder", None))

    monkeypatch.setattr("kmec.models.load.load_model", load)
    return model


def test_trace_tables_print_in_full(tiny_loaded, capsys):
    prompt = f"The home town of {LONG} is"
    assert cli("trace", prompt, "--subject", LONG, "--samples", "1", "--positions", "key") == 0
    whole(capsys.readouterr().out, f"@ '{LONG}'", "planner defaults for")


def test_stats_table_list_and_json(tiny_loaded, tmp_path, capsys):
    corpus = tmp_path / f"{LONG}.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    args = ("stats", "tiny", "--layers", "1-2", "--corpus", corpus, "--tokens", "300",
            "--max-len", "32")
    assert cli(*args, "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in data["layers"]] == [1, 2]
    assert all(r["tokens"] >= 300 and r["trace"] > 0 for r in data["layers"])
    assert cli(*args) == 0
    whole(capsys.readouterr().out, "model.layers.2.mlp.down_proj")
    assert cli("stats", "--list") == 0
    whole(capsys.readouterr().out, f"{LONG}.txt", LONG)
    assert cli("stats", "--list", "--json") == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    assert sorted(e["key"]["layer"] for e in entries) == [1, 2]


def test_fmt_json(tmp_path, capsys):
    spec = tmp_path / "a.kmec"
    spec.write_text('relation capital {  prompt "The capital of {{ subject }} is" }\n')
    assert cli("fmt", spec, "--check", "--json") == 1
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry == {"file": str(spec), "status": "changed", "written": False}
    assert cli("fmt", spec, "--diff", "--json") == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["status"] == "changed" and entry["diff"].startswith("---")
    assert cli("fmt", spec, "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["written"] is True
    assert cli("fmt", spec, "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "same"


def test_import_json(tmp_path, capsys):
    fixtures = Path(__file__).parent / "data" / "fixtures"
    source = next(iter(sorted(fixtures.glob("zsre_mend*.json"))))
    assert cli("import", "zsre", source, "--limit", "2", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["edits"] == 2 and data["spec"].startswith("#") and data["output"] is None
    assert cli("import", "zsre", source, "--limit", "2", "-o", tmp_path / "z.kmec", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["spec"] is None and data["output"] == str(tmp_path / "z.kmec")
    assert (tmp_path / "z.kmec").is_file()


def test_train_editor_json_and_the_editors_table(monkeypatch, capsys):
    from kmec.models.facts import facts_from_config
    from kmec.models.load import LoadedModel, ModelRef, fingerprint_model

    model = build_tiny_model("llama", seed=3)
    facts = facts_from_config(model.config, name=LONG, fingerprint=fingerprint_model(model))
    monkeypatch.setattr("kmec.models.load.load_model", lambda ref, **_: LoadedModel(
        model, SpaceLetterTokenizer(), facts, ModelRef(str(ref), "folder", None)))
    data = Path(__file__).parent / "backends" / "fixtures" / "zsre_mend_train_48.json"
    assert cli("train-editor", "--model", "tiny", "--data", data, "--limit", "12", "--held-out",
               "4", "--steps", "4", "--batch", "2", "--layers", "1-2", "--json") == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["model"] == LONG and manifest["metrics"]["steps"] == 4
    assert manifest["layers"] == [1, 2] and manifest["resumed_from"] == 0
    assert cli("editors", "--json") == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["sha256"] == manifest["sha256"]
    assert cli("editors") == 0
    whole(capsys.readouterr().out, LONG, "held-out efficacy", manifest["sha256"][:12])


def test_a_console_made_under_columns_does_not_keep_that_width(monkeypatch):
    """A module-level console imported while COLUMNS was set (another test, a shell) must
    read the width at each print: without COLUMNS off a terminal it prints in full."""
    import io

    from kmec.cli._console import PIPE_WIDTH, out_console

    monkeypatch.setenv("COLUMNS", "80")
    console = out_console(file=io.StringIO())
    monkeypatch.delenv("COLUMNS")
    assert console.size.width == PIPE_WIDTH
    monkeypatch.setenv("COLUMNS", "120")
    assert console.size.width == 120
