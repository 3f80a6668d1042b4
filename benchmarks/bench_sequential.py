"""Sequential CounterFact edits on the embedded model, with and without null-space projection.

    .venv/bin/python benchmarks/bench_sequential.py [--n 20] [--offset 0] [--variants alphaedit,noproj]
        [--batch-size 1] [--data ../shared/data/counterfact_easyedit/counterfact-edit.json]
        [--param KEY=JSON ...] [--layers 3-9] [--json OUT]

The AlphaEdit paper's protocol (sequential batches of 100 edits), on 1,000 records:

    .venv/bin/python benchmarks/bench_sequential.py --n 1000 --batch-size 100 \
        --variants alphaedit --json seq1000.json

The ``--n`` records after the first ``--offset`` of the CounterFact file (EasyEdit format) become
free-form edits ``prompt -> target_new`` keyed on ``subject``, in a spec with
``order sequence``; ``kmec.planner.plan`` turns it into one alphaedit step per
edit (layers, statistics and the ``protect`` lists as the planner chooses).
Each step is executed on the model that already carries the earlier edits,
exactly as ``kmec.compile.execute`` does, and its payloads are then applied.
With ``--batch-size B`` consecutive runs of B steps are merged into one step
(the batch's edits together, protecting the edits of the batches before it,
as the planner's ``protect`` list would): sequential batches of B edits.

Variants (same plan, different params):

* ``alphaedit``: the defaults (projection onto the null space of C, earlier
  edits' keys protected);
* ``noproj``: ``project = false`` (P = I), earlier keys still protected;
* ``noprotect``: projection, but no protected keys;
* ``memit``: the same steps run by the MEMIT backend (sequential MEMIT, the
  AlphaEdit paper's baseline).

``--param KEY=JSON`` (repeatable) overrides a backend parameter of every
variant after the variant's own change, e.g. a wider null space for the
capacity question of issue #17 (``--param null_space_rel=0.03``); ``--layers
3-9`` edits other layers than the planner's (the statistics follow).

Reported after all ``n`` edits (CounterFact protocol, length-normalised
target log-probability, targets scored with their leading space):

* efficacy: P(new) > P(old) on the edit prompt, over all n edits;
* immediate efficacy: the same, right after the edit's own step (its batch);
* paraphrase: P(new) > P(old) on the rephrased prompt;
* neighbourhood: P(locality truth) > P(new) on the locality prompt;
* seconds per edit (backend execution only; the statistics are cached).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kmec.artifacts import apply, build_artifact
from kmec.backends import BACKENDS, get_backend
from kmec.backends.base import ExecContext
from kmec.backends.memit import MemitParams
from kmec.cli.stats import parse_layers
from kmec.errors import StatsError
from kmec.models.adapters import adapter_for
from kmec.models.load import kmec_home, load_model
from kmec.planner import plan as make_plan
from kmec.planner.model import Step
from kmec.spec import PromptEdit, Spec
from kmec.stats import provider
from kmec.verify.scoring import Item, score_items

DATA = ROOT.parent / "shared" / "data" / "counterfact_easyedit" / "counterfact-edit.json"
VARIANTS = ("alphaedit", "noproj", "noprotect", "memit")


def load_records(path: Path, n: int, offset: int = 0) -> list[dict[str, Any]]:
    return json.loads(path.read_text())[offset:offset + n]


def sequence_spec(records: list[dict[str, Any]]) -> Spec:
    edits = tuple(PromptEdit(name=f"cf{r['case_id']}", prompt=r["prompt"], target=r["target_new"],
                             old=r["ground_truth"], subject=r["subject"]) for r in records)
    return Spec(model="smollm2-135m", order="sequence", edits=edits)


def variant_step(step: Step, variant: str, overrides: tuple[str, ...] = (),
                 layers: tuple[int, ...] | None = None) -> Step:
    """``step`` with the variant's backend and params, then the ``--param`` overrides
    (``KEY=JSON``, a dotted key for a nested field: ``value.lr=1.0``) and the ``--layers``
    (the statistics request follows the layers)."""
    if variant == "memit":
        step = step.model_copy(update={"backend": "memit",
                                       "params": MemitParams().model_dump(mode="json")})
    params = copy.deepcopy(dict(step.params))
    if variant == "noproj":
        params["project"] = False
    elif variant == "noprotect":
        params["protect"] = []
    for kv in overrides:
        key, sep, value = kv.partition("=")
        if not sep:
            raise ValueError(f"--param {kv!r}: expected KEY=JSON")
        *path, last = key.split(".")
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[last] = json.loads(value)
    update: dict[str, Any] = {"params": params}
    if layers is not None:
        update["layers"] = tuple(layers)
        if step.needs_stats is not None:
            update["needs_stats"] = step.needs_stats.model_copy(update={"layers": tuple(layers)})
    return step.model_copy(update=update)


def wins(model: Any, tok: Any, pairs: list[tuple[str, str, str]]) -> list[bool]:
    """For (prompt, a, b): mean token log P(a) > mean token log P(b) after prompt."""
    items = [Item(p, t) for p, a, b in pairs for t in (a, b)]
    scores = score_items([model], tok, items)
    return [scores[2 * i][0].mean_logprob > scores[2 * i + 1][0].mean_logprob
            for i in range(len(pairs))]


def evaluate(model: Any, tok: Any, records: list[dict[str, Any]]) -> dict[str, float]:
    eff = wins(model, tok, [(r["prompt"], r["target_new"], r["ground_truth"]) for r in records])
    para = wins(model, tok, [(r["rephrase_prompt"], r["target_new"], r["ground_truth"])
                             for r in records])
    neigh = wins(model, tok, [(r["locality_prompt"], r["locality_ground_truth"], r["target_new"])
                              for r in records])
    mean = lambda xs: sum(xs) / len(xs)
    return {"efficacy": mean(eff), "paraphrase": mean(para), "neighbourhood": mean(neigh)}


def batched_steps(steps: tuple[Step, ...], size: int) -> list[Step]:
    """Consecutive runs of ``size`` one-edit steps merged into one step each: its edits
    together, protecting the earlier batches' edits (the first step's ``protect`` list,
    which the planner filled with every edit before it)."""
    if size <= 1:
        return list(steps)
    out = []
    for b in range(0, len(steps), size):
        group = steps[b:b + size]
        first = group[0]
        out.append(first.model_copy(update={
            "id": f"batch{b // size}", "edits": tuple(e for s in group for e in s.edits)}))
    return out


def batch_plan(records: list[dict[str, Any]], lm: Any, size: int) -> list[Step]:
    """The steps of sequential batches of ``size`` edits. The planner is asked for the
    first batch's step (layers, params, statistics), which is then repeated with each
    batch's edits and the earlier batches' edits protected: planning 1,000 one-edit
    steps would list ~500,000 protected edits for nothing."""
    if size <= 1:
        return list(make_plan(sequence_spec(records), lm.facts, backends=BACKENDS).steps)
    first = make_plan(sequence_spec(records[:size]), lm.facts, backends=BACKENDS).steps
    merged = batched_steps(first, size)[0]
    steps, earlier = [], []
    for b in range(0, len(records), size):
        part = make_plan(sequence_spec(records[b:b + size]), lm.facts, backends=BACKENDS).steps
        edits = tuple(e for s in part for e in s.edits)
        params = dict(merged.params, protect=list(earlier))
        steps.append(merged.model_copy(update={"id": f"batch{b // size}", "edits": edits,
                                               "params": params}))
        earlier += [{"name": e.name, "prompt": e.prompt, "subject": e.subject} for e in edits]
    return steps


def run_variant(lm: Any, records: list[dict[str, Any]], variant: str, log: Any = print,
                batch_size: int = 1, overrides: tuple[str, ...] = (),
                layers: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Execute the sequence under ``variant``; evaluate; restore the model exactly."""
    adapter = adapter_for(lm.facts.model_type)
    steps = [variant_step(s, variant, overrides, layers) for s in batch_plan(records, lm, batch_size)]
    stats = provider(lm.model, lm.tok, lm.facts, adapter, steps[0].needs_stats)
    stats.prepare()
    applied, immediate, seconds = [], [], 0.0
    size = max(batch_size, 1)
    done = 0
    try:
        for i, step in enumerate(steps):
            recs = records[i * size:(i + 1) * size]
            ctx = ExecContext(model=lm.model, tok=lm.tok, adapter=adapter, facts=lm.facts,
                              stats=stats, cache_dir=kmec_home() / "backends",
                              seed=sequence_spec(records[:1]).seed)
            t0 = time.perf_counter()
            payloads = list(get_backend(step.backend).execute(step, ctx))
            seconds += time.perf_counter() - t0
            art = build_artifact([(step.id, payloads)], base_model="smollm2-135m",
                                 base_fingerprint=lm.facts.fingerprint, base_arch=lm.facts.arch,
                                 weight_layout=adapter.weight_layout, plan_hash="bench")
            applied.append(apply(art, lm.model, check=False))
            immediate += wins(lm.model, lm.tok, [(rec["prompt"], rec["target_new"],
                                                  rec["ground_truth"]) for rec in recs])
            done += len(recs)
            if size > 1 or done % 5 == 0 or done == len(records):
                log(f"  {variant}: {done}/{len(records)} edits, {seconds / done:.1f} s/edit, "
                    f"immediate efficacy so far {sum(immediate) / len(immediate):.2f}", flush=True)
        out = evaluate(lm.model, lm.tok, records)
    finally:
        for a in reversed(applied):
            a.revert()
    out.update(variant=variant, n=len(records), batch_size=size, params=list(overrides),
               layers=list(steps[0].layers),
               immediate=sum(immediate) / len(immediate),
               seconds_per_edit=seconds / len(records), seconds=seconds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--offset", type=int, default=0,
                    help="skip this many records first (tune on records a table does not score)")
    ap.add_argument("--variants", default="alphaedit,noproj")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--batch-size", type=int, default=1,
                    help="edits per sequential step (the AlphaEdit paper: 100)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                    help="override a backend parameter of every variant, e.g. --param "
                         "null_space_rel=0.03 or a nested one, --param value.lr=1.0")
    ap.add_argument("--layers", help="edit these layers instead of the planner's (3-9 or 2,5,8)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    try:  # bad --layers or --param: a usage error before the model loads
        layers = parse_layers(args.layers) if args.layers else None
        for kv in args.param:
            key, sep, value = kv.partition("=")
            if not (key and sep):
                raise ValueError(f"--param {kv!r}: expected KEY=JSON, e.g. null_space_rel=0.03")
            try:
                json.loads(value)
            except ValueError:
                raise ValueError(f"--param {kv!r}: {value!r} is not JSON") from None
    except (StatsError, ValueError) as exc:
        ap.error(str(exc))
    if not args.data.is_file():  # a usage error, not a traceback after the model loads
        ap.error(f"--data {args.data}: no such file")
    lm = load_model("smollm2-135m")
    records = load_records(args.data, args.n, args.offset)
    base = evaluate(lm.model, lm.tok, records)
    print(f"base model on {len(records)} records: efficacy {base['efficacy']:.2f}, paraphrase "
          f"{base['paraphrase']:.2f}, neighbourhood {base['neighbourhood']:.2f}")
    results = [dict(base, variant="base", n=len(records))]
    for v in variants:
        r = run_variant(lm, records, v, batch_size=args.batch_size, overrides=tuple(args.param),
                        layers=layers)
        results.append(r)
        print(f"{v}: after {r['n']} sequential edits: efficacy {r['efficacy']:.2f} (immediate "
              f"{r['immediate']:.2f}), paraphrase {r['paraphrase']:.2f}, neighbourhood "
              f"{r['neighbourhood']:.2f}; {r['seconds_per_edit']:.1f} s/edit, {r['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
