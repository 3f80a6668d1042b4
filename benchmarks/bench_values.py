"""Benchmark the δ (value) optimisation that dominates ROME / MEMIT compile time.

    .venv/bin/python benchmarks/bench_values.py [--n 32] [--rounds 2] [--layer L]

The same CounterFact edits (the first ``--n`` records of the EasyEdit file)
are optimised at MEMIT's top layer with MEMIT's defaults (4 context prefixes,
batches of 16 edits, early stop at probability 0.9), two ways in one process,
interleaved round by round so CPU contention hits both alike:

* baseline: every edit's rows stay in every forward/backward pass until the
  whole batch has finished (``compact=False``);
* kmec: an edit that reached its target leaves the batch (``compact=True``).

Both must give the same δ (max abs difference reported); the ratio of their
times is the figure quoted in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_editing import normalise, request

from kmec.backends.keys import context_prefixes
from kmec.backends.memit import MemitParams
from kmec.backends.values import optimise_deltas
from kmec.models.adapters import adapter_for
from kmec.models.load import kmec_home, load_model
from kmec.planner.layers import default_layers

EASYEDIT = (Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact_easyedit"
            / "counterfact-edit.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layer", type=int, help="default: MEMIT's top layer")
    ap.add_argument("--data", type=Path, default=EASYEDIT)
    args = ap.parse_args()
    if not args.data.is_file():  # a usage error, not a traceback after the model loads
        ap.error(f"--data {args.data}: no such file")
    lm = load_model("smollm2-135m")
    adapter = adapter_for(lm.facts.model_type)
    records = [normalise(r) for r in json.loads(args.data.read_text())[: args.n]]
    edits = [request(r, i) for i, r in enumerate(records)]
    p = MemitParams()
    layer = args.layer if args.layer is not None else max(default_layers(lm.facts, "memit").layers)
    prefixes = context_prefixes(lm.model, lm.tok, n=p.n_prefixes, length=p.prefix_len, seed=0,
                                cache_dir=kmec_home() / "backends", fingerprint=lm.facts.fingerprint)
    times: dict[str, list[float]] = {"baseline": [], "kmec": []}
    out: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, compact in (("baseline", False), ("kmec", True)):
            t = time.perf_counter()
            out[name], prob = optimise_deltas(lm.model, lm.tok, adapter, layer, edits, prefixes,
                                              p.value, compact=compact)
            times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    result = {"n": len(edits), "layer": layer, "rounds": args.rounds,
              "baseline_s": round(best["baseline"], 2), "kmec_s": round(best["kmec"], 2),
              "speedup": round(best["baseline"] / best["kmec"], 2),
              "max_abs_delta_diff": float((out["baseline"] - out["kmec"]).abs().max()),
              "rel_frobenius_diff": float((out["baseline"] - out["kmec"]).norm()
                                          / out["baseline"].norm()),
              "reached_stop_prob": float((prob >= p.value.stop_prob).float().mean()),
              "torch_threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
