"""Sweep a compile parameter over a spec and report which claims hold (issue #10).

Run: .venv/bin/python benchmarks/sweep_locality.py SPEC --param locality_weight --values 0,0.1,1

The spec is planned once; for each value the plan's steps get the parameter
(a backend parameter such as ``locality_weight``, or ``value.scope_weight``),
the plan is executed (target values come from the cache when only the solve
changed) and verified with the verifier's own code; one line per claim label:
how many edits hold it and the mean score. These are the spec's *declared*
scores: a parameter chosen this way must be judged on other records.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--param", default="locality_weight",
                    help="step parameter; dotted for nested ones (value.scope_weight)")
    ap.add_argument("--values", default="0,1")
    ap.add_argument("--max-examples", type=int, default=None)
    args = ap.parse_args()

    from kmec.artifacts.build import write_build
    from kmec.backends import BACKENDS
    from kmec.compile import execute
    from kmec.pipeline import start, verify_build
    from kmec.planner import plan as make_plan

    s = start(args.spec)
    base = make_plan(s.spec, s.lm.facts, backends=BACKENDS, editors=s.editors)
    out = Path(tempfile.mkdtemp(prefix="kmec-sweep-")) / "build"
    for raw in args.values.split(","):
        value = float(raw)
        steps = []
        for st in base.steps:
            params = dict(st.params)
            head, _, tail = args.param.partition(".")
            if tail:
                params[head] = {**params.get(head, {}), tail: value}
            else:
                params[head] = value
            steps.append(st.model_copy(update={"params": params}))
        plan = base.model_copy(update={"steps": tuple(steps)})
        t0 = time.perf_counter()
        art = execute(plan, s.lm)
        t1 = time.perf_counter()
        if out.exists():
            shutil.rmtree(out)
        write_build(out, plan=plan, spec=s.spec, artifact=art, spec_path=args.spec,
                    model=s.model, log="sweep\n")
        report = verify_build(out, max_examples=args.max_examples)
        t2 = time.perf_counter()
        print(f"{args.param}={value:g}: compile {t1 - t0:.0f} s, verify {t2 - t1:.0f} s", flush=True)
        labels: dict[str, list] = {}
        for c in report.claims:
            if c.status != "n/a":
                labels.setdefault(c.claim, []).append(c)
        for label, rows in labels.items():
            held = sum(r.status == "pass" for r in rows)
            scores = [r.score for r in rows if r.score is not None]
            print(f"  {label}: {held}/{len(rows)} hold, mean {sum(scores) / max(len(scores), 1):.3f}")


if __name__ == "__main__":
    main()
