"""Worker for test_distributed.py, run under torchrun: tiny Llama stats over 2 CPU ranks.

Usage: torchrun --nproc-per-node 2 --standalone tests/stats/_dist_worker.py OUT CORPUS
Writes OUT/rank{r}.pt with every rank's (reduced) states and sources.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch

from kmec.models.adapters import adapter_for
from kmec.models.facts import facts_from_config
from kmec.planner.model import StatsRequest
from kmec.stats import StatsCache, distributed, provider
from tests.conftest import ByteTokenizer, build_tiny_model

LAYERS = (0, 2)
TOKENS = 1200
MAX_LEN = 40


def run(out: Path, corpus: str) -> None:
    info = distributed.init_from_env("cpu")
    assert info.world == 2, info
    model = build_tiny_model("llama")
    facts = facts_from_config(model.config, name="tiny-llama")
    request = StatsRequest(layers=LAYERS, tokens=TOKENS, max_len=MAX_LEN)
    stats = provider(model, ByteTokenizer(), facts, adapter_for("llama"), request,
                     corpus=corpus, cache=StatsCache(out / "cache"), batch_tokens=80, pool_size=3)
    moments = stats.prepare()
    torch.save({"states": {l: sm.state_dict() for l, sm in moments.items()},
                "sources": stats.sources, "world": info.world},
               out / f"rank{info.rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2])
