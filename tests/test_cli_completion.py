"""Shell completion: ``kmec --show-completion``/``--install-completion`` (typer's, with
shellingham) and the completion protocol the installed script calls on TAB."""

from __future__ import annotations

import os
import subprocess
import sys


def kmec(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kmec", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_show_completion_prints_a_bash_script_for_kmec():
    proc = kmec("--show-completion", "bash")
    assert proc.returncode == 0, proc.stderr
    assert "complete -o default -F _kmec_completion kmec" in proc.stdout
    assert "_KMEC_COMPLETE=complete_bash" in proc.stdout


def test_install_completion_writes_the_script_under_home(tmp_path):
    proc = kmec("--install-completion", "bash", env={"HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / ".bash_completions" / "kmec.sh"
    assert "_kmec_completion" in script.read_text()
    assert f"source '{script}'" in (tmp_path / ".bashrc").read_text()


def test_tab_completes_commands_and_options():
    def complete(line: str) -> list[str]:
        words = line.split(" ")
        proc = kmec(env={"COMP_WORDS": line, "COMP_CWORD": str(len(words) - 1),
                         "_KMEC_COMPLETE": "complete_bash"})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert complete("kmec ver") == ["verify"]
    assert "--report-dir" in complete("kmec verify --re")
