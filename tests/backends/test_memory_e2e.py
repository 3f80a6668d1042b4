"""End to end on the real embedded model: the two external-memory example specs
compile and verify (`kmec compile SPEC --out DIR && kmec verify DIR`), the
audit proves no weight changed, and `kmec apply` writes a folder that one
`kmec.load_model` call turns back into the edited model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kmec

EXAMPLES = Path(__file__).resolve().parents[2] / "specs" / "examples"


def kmec_cli(*args, cwd):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-m", "kmec", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("name,backend", [("frozen_memory", "memory"),
                                          ("frozen_retrieval", "retrieval")])
def test_example_compiles_verifies_and_loads(real_model, tmp_path, name, backend):
    r = kmec_cli("compile", str(EXAMPLES / f"{name}.kmec"), "--out", "build", "--no-cache",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "build" / "plan.json").read_text())
    assert [s["backend"] for s in plan["steps"]] == [backend]

    r = kmec_cli("verify", "build", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "build" / "report" / "report.json").read_text())
    assert report["ok"] and report["audit"]["ok"]

    r = kmec_cli("apply", "build", "--out", "edited", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    edited = kmec.load_model(str(tmp_path / "edited"))
    assert edited.memory is not None
    assert edited.facts.fingerprint == real_model.facts.fingerprint  # weights untouched
    tok = edited.tok
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = edited.model.generate(**ids, max_new_tokens=3, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
    assert "Lyon" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    edited.memory.revert()
    with torch.no_grad():
        base = real_model.model(**ids).logits
        assert torch.equal(edited.model(**ids).logits, base)
