"""``kmec diff``: specs, builds and reports; exactly the edit that changed and the scores
that moved; text, Markdown and JSON; exit codes 0 / 1 / 2."""

from __future__ import annotations

import json

import torch

from kmec.artifacts import save_artifact
from kmec.artifacts.payloads import LowRank
from kmec.diff import diff, read_side, render_markdown, render_text
from kmec.hashing import canonical_json
from tests.verify.conftest import CLAIMS, PARAM, artifact_of, cli, make_plan, make_spec

SPEC = """\
model "smollm2-135m"
relation capital { prompt "The capital of {{ subject }} is" }
edit kz { subject "Kazakhstan" relation capital "Astana" -> "Almaty" }
edit peru { subject "Peru" relation capital "Lima" -> "Cusco" }
claim efficacy >= 0.9
claim locality >= 0.9 kl 0.1
"""


def test_two_specs_name_the_edit_and_the_claim_that_changed(tmp_path, capsys):
    (tmp_path / "a.kmec").write_text(SPEC)
    (tmp_path / "b.kmec").write_text(
        SPEC.replace('"Lima" -> "Cusco"', '"Lima" -> "Arequipa"').replace("0.9 kl", "0.95 kl")
        + 'edit cup { prompt "The 2022 World Cup was won by" -> "France" }\n')
    d = diff(read_side(tmp_path / "a.kmec"), read_side(tmp_path / "b.kmec"))
    assert d.compared == ("settings", "edits", "claims")
    assert d.edits_changed() == ("peru", "cup")
    what = {(c.section, c.what, c.verb): (c.before, c.after) for c in d.changes}
    assert what[("edits", "peru.new", "changed")] == ("Cusco", "Arequipa")
    assert ("edits", "cup", "added") in what
    assert what[("claims", "locality[kl<=0.1].threshold", "changed")] == (0.9, 0.95)
    assert len(d.changes) == 3
    text = render_text(d)
    assert "peru.new" in text and "Cusco" in text and "Arequipa" in text
    assert "| `peru.new` | changed | `Cusco` | `Arequipa` |" in render_markdown(d)

    assert cli("diff", tmp_path / "a.kmec", tmp_path / "a.kmec") == 0
    assert "no differences" in capsys.readouterr().out
    assert cli("diff", tmp_path / "a.kmec", tmp_path / "b.kmec", "--json") == 1
    out = json.loads(capsys.readouterr().out)
    assert {c["what"] for c in out["changes"]} == {"peru.new", "cup",
                                                   "locality[kl<=0.1].threshold"}


def test_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("hello")
    assert cli("diff", tmp_path / "x.txt", tmp_path / "nope.kmec") == 2
    assert "is not a spec, a build directory or a verification report" in capsys.readouterr().err


def _build(setup, folder, new, payloads):
    """A build (as kmec compile writes it) of the tiny spec with target ``new``."""
    spec = make_spec(setup.old, new, CLAIMS)
    plan = make_plan(spec, setup.fingerprint)
    folder.mkdir()
    (folder / "plan.json").write_text(plan.to_json())
    (folder / "spec.json").write_text(canonical_json(spec.model_dump(mode="json")))
    art = artifact_of(payloads, setup.fingerprint, plan)
    (folder / "build.json").write_text(canonical_json({
        "model": "tiny", "plan_hash": plan.sha256, "kmec_version": "0.1.0",
        "artifact_sha256": art.manifest.sha256}))
    save_artifact(art, folder / "artifact")
    return folder


def test_two_verified_builds_name_the_retargeted_edit_and_the_scores_that_moved(
        setup, tmp_path, tiny_loader, good, capsys):
    other = next(c for c in "QWERTYUIOP" if c not in (setup.new, setup.old))
    g = torch.Generator().manual_seed(5)
    broad = LowRank(PARAM, torch.randn(32, 1, generator=g) * 3,
                    torch.randn(2048, 1, generator=g) * 3)
    a = _build(setup, tmp_path / "a", setup.new, [good])
    b = _build(setup, tmp_path / "b", other, [broad])
    assert cli("verify", a, "--max-examples", "10") == 0
    assert cli("verify", b, "--max-examples", "10") == 1
    capsys.readouterr()

    d = diff(read_side(a), read_side(b))
    assert d.compared == ("settings", "edits", "claims", "plan", "scores")
    assert d.edits_changed() == ("france",)
    by = {(c.section, c.what): c for c in d.changes}
    assert (by[("edits", "france.new")].before, by[("edits", "france.new")].after) == \
        (setup.new, other)
    assert ("plan", "s00-rome.france.target_new") in by
    moved = [c.what for c in d.changes if c.section == "scores"]
    assert "efficacy on france" in moved and "verdict" in moved
    assert all(c.section in ("edits", "plan", "scores") for c in d.changes)

    assert cli("diff", a / "report" / "report.json", b / "report", "--md") == 1
    md = capsys.readouterr().out
    assert "### scores" in md and "`efficacy on france`" in md


def test_the_chat_setting_is_a_setting_that_changed(tmp_path):
    (tmp_path / "a.kmec").write_text(SPEC)
    (tmp_path / "b.kmec").write_text('chat on\n' + SPEC)
    (tmp_path / "c.kmec").write_text('chat on system "Answer in one word."\n' + SPEC)
    d = diff(read_side(tmp_path / "a.kmec"), read_side(tmp_path / "b.kmec"))
    assert [(c.what, c.before, c.after) for c in d.changes] == [
        ("chat", None, {"kind": "chat", "system": None})]
    d = diff(read_side(tmp_path / "b.kmec"), read_side(tmp_path / "c.kmec"))
    assert [(c.what, c.before, c.after) for c in d.changes] == [
        ("chat.system", None, "Answer in one word.")]
