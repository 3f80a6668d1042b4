"""``kmec import``: writes a checked spec, prints it without -o, explains bad input."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kmec.cli import data as data_cli
from kmec.grammar import parse_file

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture()
def cli():
    app = typer.Typer()
    data_cli.register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer's subcommand layout

    def invoke(*args: str):
        return CliRunner().invoke(app, list(map(str, args)))

    return invoke


def test_import_writes_a_spec_that_checks(cli, tmp_path: Path) -> None:
    out = tmp_path / "cf.kmec"
    r = cli("import", "counterfact", FIXTURES / "counterfact.json", "--limit", 3, "-o", out,
            "--model", "smollm2-135m")
    assert r.exit_code == 0, r.output
    assert f"wrote {out}: 3 edits" in r.output
    text = out.read_text()
    assert text.startswith("# Imported from CounterFact (ROME format)")
    assert (f"#   kmec import counterfact {FIXTURES / 'counterfact.json'} --limit 3 -o {out} "
            "--model smollm2-135m") in text
    spec = parse_file(out)
    assert spec.model == "smollm2-135m" and len(spec.edits) == 3
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_import_prints_without_output(cli) -> None:
    r = cli("import", "knowedit", FIXTURES / "knowedit_zsre.json", "--offset", 4)
    assert r.exit_code == 0, r.output
    assert "edit ke_4 {" in r.output and "edit ke_3 {" not in r.output


def test_import_bad_dataset_raises_kmec_error(cli) -> None:
    r = cli("import", "mquake", FIXTURES / "zsre_mend_eval.json")
    assert r.exit_code != 0
    assert "not a MQuAKE record" in str(r.exception)
    assert "kmec import zsre" in r.exception.hint
