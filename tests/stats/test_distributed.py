"""torchrun with 2 CPU ranks (gloo) gives the single-process moments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kmec.models.adapters import adapter_for
from kmec.models.facts import facts_from_config
from kmec.planner.model import StatsRequest
from kmec.stats import SecondMoment, StatsCache, provider
from kmec.stats.distributed import DistInfo, all_reduce_moments, broadcast, current
from tests.conftest import ByteTokenizer, build_tiny_model
from tests.stats import _dist_worker as worker

TEXT = "\n\n".join(f"Document {i}: " + "the quick brown fox jumps " * (i % 7 + 1)
                   for i in range(40)) + "\n"


def test_without_a_process_group_everything_is_local():
    assert current() == DistInfo(0, 1) and current().is_main
    sm = SecondMoment(3)
    sm.add(torch.ones(2, 3))
    all_reduce_moments({0: sm})
    assert sm.count == 2
    assert broadcast([1, 2]) == [1, 2]


def test_two_cpu_ranks_equal_one_process(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "dist"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(worker.ROOT))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           worker.__file__, str(out), str(corpus)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]

    model = build_tiny_model("llama")
    request = StatsRequest(layers=worker.LAYERS, tokens=worker.TOKENS, max_len=worker.MAX_LEN)
    single = provider(model, ByteTokenizer(), facts_from_config(model.config, name="tiny-llama"),
                      adapter_for("llama"), request, corpus=corpus,
                      cache=StatsCache(tmp_path / "single")).prepare()
    for layer in worker.LAYERS:
        for r in ranks:
            state = r["states"][layer]
            assert int(state["count"]) == single[layer].count == worker.TOKENS
            # same tokens, other batches: equal up to float32 block sums
            torch.testing.assert_close(state["sum"], single[layer].total(), rtol=1e-5, atol=1e-5)
    # rank 0 wrote the cache once, with the reduced count
    entries = StatsCache(out / "cache").entries()
    assert sorted(e.key.layer for e in entries) == list(worker.LAYERS)
    assert all(e.tokens == worker.TOKENS for e in entries)
    assert not list((out / "cache" / "checkpoints").glob("*"))
