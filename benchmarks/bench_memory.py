"""CounterFact benchmark for the external-memory backends (weights untouched) on the embedded model.

Same protocol and scores as ``bench_editing.py`` (probability comparison:
efficacy, paraphrase, neighbourhood), with all N edits in one memory table.

Two settings:

* held out (default): each edit request carries only its prompt, subject and
  target; the record's paraphrase and neighbourhood prompts are used for
  scoring only, never seen while compiling;
* ``--declared``: the paraphrases are the edit's ``scope`` and the
  neighbourhood prompts its ``preserve`` prompts, as ``kmec import
  counterfact`` writes them into a spec (the memory then trains / calibrates
  on the very prompts it is scored on: an upper bound, not generalisation).

  python benchmarks/bench_memory.py --method memory --n 20
  python benchmarks/bench_memory.py --method retrieval --n 20
  python benchmarks/bench_memory.py --method memory --n 20 --layer 25   # GRACE's late layer

Seconds per edit: compile time of the step (including the embedder load or
the context-prefix sampling on first use) divided by N.
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
from bench_editing import DATA, mean, normalise, scores

from kmec.artifacts import apply, build_artifact
from kmec.backends import BACKENDS, get_backend
from kmec.backends.base import ExecContext
from kmec.models.adapters import adapter_for
from kmec.models.load import kmec_home, load_model
from kmec.planner.layers import default_layers
from kmec.planner.model import EditRequest, Step


def request(rec: dict, i: int, declared: bool) -> EditRequest:
    extra = {}
    if declared:
        extra = {"scope": tuple(rec["paraphrases"]),
                 "preserve": tuple(p for p, _ in rec["neighbours"])}
    return EditRequest(name=f"cf{i}", prompt=rec["prompt"], subject=rec["subject"],
                       target_new=rec["new"], target_old=rec["true"], **extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=("memory", "retrieval"), default="memory")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--layer", type=int, help="codebook layer (default: the planner's)")
    ap.add_argument("--declared", action="store_true",
                    help="use paraphrases as scope and neighbours as preserve prompts")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                    help="override a backend parameter, e.g. --param init_radius=0.4")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.data.is_file():  # a usage error, not a traceback after the model loads
        ap.error(f"--data {args.data}: no such file")
    torch.manual_seed(0)
    lm = load_model("smollm2-135m")
    adapter = adapter_for(lm.facts.model_type)
    records = [normalise(r) for r in json.loads(args.data.read_text())[: args.n]]
    backend = get_backend(args.method)
    params = backend.default_params(lm.facts).model_dump(mode="json")
    for kv in args.param:
        key, value = kv.split("=", 1)
        params[key] = json.loads(value)
    layers: tuple[int, ...] = ()
    if args.method == "memory":
        layers = (args.layer,) if args.layer is not None else \
            default_layers(lm.facts, BACKENDS["memory"].info.layer_role).layers
    ctx = ExecContext(model=lm.model, tok=lm.tok, adapter=adapter, facts=lm.facts,
                      cache_dir=kmec_home() / "backends", seed=0,
                      progress=lambda m, d, t: print(f"{m} {d}/{t}", flush=True))
    before = scores(lm.model, lm.tok, records)
    step = Step(id="s0", backend=args.method, layers=layers, params=params,
                edits=tuple(request(r, i, args.declared) for i, r in enumerate(records)))
    t = time.perf_counter()
    payloads = backend.execute(step, ctx)
    t_edit = time.perf_counter() - t
    art = build_artifact([(step.id, payloads)], base_model="smollm2-135m", base_fingerprint="",
                         base_arch="", weight_layout=adapter.weight_layout, plan_hash="")
    handle = apply(art, lm.model, check=False, tok=lm.tok)
    after = scores(lm.model, lm.tok, records)
    handle.revert()
    entries = int(payloads[0].keys.shape[0])
    routing = {}
    if args.method == "retrieval":  # what the scope classifier lets in, on the bare prompts
        from kmec.artifacts.scope import ScopeClassifier

        clf = ScopeClassifier.from_tables(list(payloads), lm.tok)
        para = [(i, p) for i, r in enumerate(records) for p in r["paraphrases"]]
        neigh = [p for r in records for p, _ in r["neighbours"]]
        got = clf.decide([p for _, p in para])
        routing = {"paraphrases_to_their_edit": sum(g is not None and g[1] == i
                                                    for (i, _), g in zip(para, got)) / len(para),
                   "neighbours_in_some_scope": sum(g is not None for g in clf.decide(neigh))
                   / len(neigh)}
    result = {"method": args.method, "n": len(records), "data": str(args.data),
              "layers": list(layers), "declared": args.declared, "entries": entries,
              "params": {k: v for k, v in params.items() if k != "template"},
              **routing, "efficacy": mean(after, "efficacy"), "paraphrase": mean(after, "paraphrase"),
              "neighbourhood": mean(after, "neighbourhood"),
              "neighbourhood_unedited": mean(before, "neighbourhood"),
              "efficacy_unedited": mean(before, "efficacy"),
              "seconds_total_edit": round(t_edit, 2),
              "seconds_per_edit": round(t_edit / max(len(records), 1), 2),
              "torch_threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
