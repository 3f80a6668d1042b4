"""Benchmark: import 2,000 CounterFact records and check the spec (target: under 10 s).

Run: .venv/bin/python benchmarks/bench_import.py [--records 2000] [--repeat 3] [--data DIR]

Two loads, each timed as ``kmec import`` does the work: read + hash the file,
map the records, format the spec text, then parse + check that text (what
``kmec check`` runs):

- **EasyEdit format**: the first N records of ``counterfact-edit.json`` (one
  scope and one preserve prompt per edit: prompt edits).
- **ROME format**: N records of ``counterfact.json`` (2 scope and 10 preserve
  prompts per edit, one relation per template). The release subset has 914
  records, so it is cycled with a copy number added to each subject and case
  id, which keeps every copy a distinct edit (no merges, no contradictions).

Then the imported EasyEdit spec is planned for the embedded model, as
``kmec plan`` does (model facts from its config, no weights), and the
planner's default choice is printed with the planning time; compiling that
choice is what BENCHMARKS.md's "imported spec" figure measures.

``--data`` is the benchmark data folder (default ``../shared/data`` beside the
repository); without it the test fixtures are cycled instead. The figure is
the best of ``--repeat`` runs after one warm-up (which builds the LALR tables).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from kmec.data import import_file
from kmec.grammar import analyze

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "fixtures"


def cycled(records: list[dict], n: int, rome: bool) -> list[dict]:
    """``n`` records: ``records`` repeated, copy k's subjects and ids made distinct."""
    out = []
    for i in range(n):
        k, rec = divmod(i, len(records))
        rec = copy.deepcopy(records[rec])
        if k:
            rec["case_id"] = rec.get("case_id", 0) + 100_000 * k
            where = rec["requested_rewrite"] if rome else rec
            old = where["subject"]
            where["subject"] = f"{old} {k + 1}"
            if not rome:
                rec["prompt"] = rec["prompt"].replace(old, where["subject"])
        out.append(rec)
    return out


def run_once(path: Path) -> tuple[float, float, int, int]:
    """(import seconds, check seconds, edits, text bytes) for one import of ``path``."""
    t0 = time.perf_counter()
    imported = import_file("counterfact", path)
    text = imported.text
    t1 = time.perf_counter()
    analysis = analyze(text, path="bench.kmec")
    t2 = time.perf_counter()
    if analysis.errors:
        raise SystemExit(analysis.errors[0].render())
    return t1 - t0, t2 - t1, len(imported.spec.edits), len(text.encode())


def plan_imported(path: Path) -> None:
    """Plan the imported spec for the embedded model; print the choice and the time."""
    from kmec.models.facts_io import facts_for_ref
    from kmec.models.load import DEFAULT_MODEL
    from kmec.planner import plan

    spec = import_file("counterfact", path).spec
    facts = facts_for_ref(DEFAULT_MODEL)
    t0 = time.perf_counter()
    from kmec.backends import BACKENDS

    result = plan(spec, facts, backends=BACKENDS)
    took = time.perf_counter() - t0
    steps = ", ".join(f"{s.id} ({len(s.edits)} edits, layers {list(s.layers)})"
                      for s in result.steps)
    why = next((r.because for r in result.reasons if r.choice.startswith("backend")), "")
    print(f"plan for {DEFAULT_MODEL}: {steps} in {took * 1000:.0f} ms"
          + (f" - {why}" if why else ""))


def bench(label: str, path: Path, repeat: int) -> float:
    run_once(path)  # warm-up: LALR tables, template cache
    runs = [run_once(path) for _ in range(repeat)]
    imp, chk, n, size = min(runs, key=lambda r: r[0] + r[1])
    total = imp + chk
    print(f"{label}: {n} edits, {size / 1024:.0f} KiB spec - import {imp * 1000:.0f} ms + "
          f"check {chk * 1000:.0f} ms = {total:.2f} s (best of {repeat}) - target < 10 s: "
          f"{'ok' if total < 10 else 'SLOW'}")
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    real = (args.data / "counterfact" / "counterfact.json").is_file()
    rome_src = args.data / "counterfact" / "counterfact.json" if real else \
        FIXTURES / "counterfact.json"
    flat_src = args.data / "counterfact_easyedit" / "counterfact-edit.json" if real else \
        FIXTURES / "counterfact-edit.json"
    print(f"records from {'the benchmark data' if real else 'the test fixtures (cycled)'}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, src, rome in (("EasyEdit format", flat_src, False),
                                 ("ROME format", rome_src, True)):
            records = json.loads(src.read_text(encoding="utf-8"))
            path = Path(tmp) / f"{'rome' if rome else 'flat'}.json"
            path.write_text(json.dumps(cycled(records, args.records, rome)), encoding="utf-8")
            bench(label, path, args.repeat)
            if not rome:
                plan_imported(path)


if __name__ == "__main__":
    main()
