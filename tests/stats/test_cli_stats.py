"""``kmec stats``: layer parsing, --list, errors, and a short run on the real model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmec.cli.stats import parse_layers
from kmec.errors import StatsError


def run(*args, home: Path):
    env = {**os.environ, "KMEC_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "kmec", *args], capture_output=True, text=True,
                          env=env, timeout=600, check=False)


def test_parse_layers():
    assert parse_layers("3-8") == (3, 4, 5, 6, 7, 8)
    assert parse_layers("7, 2,4-5,4") == (2, 4, 5, 7)
    for bad in ("", "a", "5-3", "1-"):
        with pytest.raises(StatsError):
            parse_layers(bad)


def test_list_and_missing_arguments(tmp_path, tiny_models):
    r = run("stats", "--list", home=tmp_path)
    assert r.returncode == 0 and "no cached statistics" in r.stdout
    r = run("stats", "smollm2-135m", home=tmp_path)
    assert r.returncode == 2 and "--layers" in r.stderr and "Traceback" not in r.stderr

    from kmec.models.adapters import adapter_for
    from kmec.models.facts import facts_from_config
    from kmec.planner.model import StatsRequest
    from kmec.stats import StatsCache, provider
    from tests.conftest import ByteTokenizer

    model = tiny_models["gpt2"]
    provider(model, ByteTokenizer(), facts_from_config(model.config, name="tiny-gpt2"),
             adapter_for("gpt2"), StatsRequest(layers=(1, 3), tokens=300, max_len=32),
             cache=StatsCache(tmp_path / "stats")).prepare()
    r = run("stats", "--list", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("tiny-gpt2") == 2 and "2 entries" in r.stdout


@pytest.mark.slow
def test_stats_command_on_the_real_model(tmp_path, real_model):
    from kmec.models.load import kmec_home

    (tmp_path / "models").symlink_to(kmec_home() / "models")
    args = ("stats", "smollm2-135m", "--layers", "3,5", "--tokens", "300", "--max-len", "64")
    r = run(*args, home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "computed (300 tokens)" in r.stdout
    r = run(*args[:4], "--tokens", "200", "--max-len", "64", home=tmp_path)
    assert r.returncode == 0 and "cache (300 tokens)" in r.stdout
