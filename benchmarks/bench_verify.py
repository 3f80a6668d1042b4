"""Benchmark verification on the embedded model (SmolLM2-135M).

    .venv/bin/python benchmarks/bench_verify.py [--prompts 200] [--rounds 2]
        [--spec specs/examples/capitals.kmec] [--threads N] [--skip-budget] [--write]

(a) Scoring: the same prompts (locality-style bare prompts and prompt +
    target pairs, as ``kmec verify`` scores them) through
    ``kmec.verify.scoring.score_items`` in padded batches, and one prompt at a
    time, interleaved round by round in one process so CPU contention from
    other work hits both alike. Target: batched ≥ 5× faster; the two must
    agree within 1e-4.
(b) Budget: a full ``kmec.verify.verify`` of ``--spec`` (default: the README
    demo ``specs/examples/capitals.kmec``: 12 edits, a locality claim of 200
    drawn prompts per edit, efficacy, generality and reversal claims),
    compiled first with ``kmec.compile`` (its step cache makes reruns quick).
    Target: < 60 s after the model is loaded.

``--write`` puts the results, the command, the machine and the date into the
"Verification" section of BENCHMARKS.md (between its markers; other sections
are left alone).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

# As ``kmec verify`` does (kmec/cli/verify.py): idle OpenMP threads sleep
# rather than spin, which matters on a shared 2-core machine. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kmec.artifacts import apply
from kmec.models.load import load_model
from kmec.verify import canaries, verify
from kmec.verify.scoring import Item, _rows, encode_item, score_items

BEGIN, END = "<!-- verify:begin -->", "<!-- verify:end -->"
CAPITALS = [("France", "Paris", "Lyon"), ("Germany", "Berlin", "Munich"), ("Italy", "Rome", "Milan"),
            ("Spain", "Madrid", "Barcelona"), ("Japan", "Tokyo", "Osaka"),
            ("Canada", "Ottawa", "Toronto"), ("Australia", "Canberra", "Sydney"),
            ("Turkey", "Ankara", "Istanbul"), ("India", "New Delhi", "Mumbai"),
            ("Egypt", "Cairo", "Alexandria"), ("Brazil", "Brasília", "Rio"),
            ("Russia", "Moscow", "Kazan"), ("China", "Beijing", "Shanghai"),
            ("Kenya", "Nairobi", "Mombasa")]
NEIGHBOURS = ("Portugal", "Poland", "Greece", "Sweden", "Norway", "Austria", "Belgium", "Ireland",
              "Finland", "Denmark", "Hungary", "Peru", "Chile", "Argentina", "Mexico", "Cuba",
              "Vietnam", "Thailand", "Nepal", "Iran", "Iraq", "Morocco", "Ghana", "Nigeria")
TEMPLATES = ("The capital of {{ subject }} is", "{{ subject }}'s capital city is",
             "The seat of government of {{ subject }} is in")


def bench_prompts(n: int) -> list[Item]:
    """n scoring items: neighbour prompts, corpus prefixes, questions, and edit pairs."""
    items: list[Item] = []
    for s in NEIGHBOURS:
        items += [Item(t.replace("{{ subject }}", s)) for t in TEMPLATES]
    for sent in canaries.sentences():
        w = sent.split()
        items += [Item(" ".join(w[:k])) for k in range(3, len(w) + 1, 3)]
    items += [Item(q) for q in canaries.GENERAL_QUESTIONS]
    for s, old, new in CAPITALS:
        items += [Item(f"The capital of {s} is", old), Item(f"The capital of {s} is", new)]
    return items[:n]


def bench_scoring(model, tok, items: list[Item], rounds: int) -> dict:
    batched_t, single_t, diff = [], [], 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        batched = score_items([model], tok, items)
        batched_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        single = [score_items([model], tok, [it])[0] for it in items]
        single_t.append(time.perf_counter() - t0)
        for b, s in zip(batched, single):
            pairs = list(zip(b[0].target_logprobs, s[0].target_logprobs))
            pairs += list(zip(b[0].top_probs, s[0].top_probs))
            diff = max([diff] + [abs(x - y) for x, y in pairs])
    tb, ts = min(batched_t), min(single_t)
    rows = len(_rows([encode_item(tok, it) for it in items]))
    tokens = sum(len(tok(it.prompt + (" " + it.target if it.target else ""))["input_ids"])
                 for it in items)
    return {"n": len(items), "rows": rows, "tokens": tokens, "batched_s": tb, "single_s": ts,
            "speedup": ts / tb, "max_diff": diff}


def bench_budget(spec_path: Path, build: Path) -> dict:
    """Compile ``spec_path`` (cached steps make a rerun quick) and time ``verify`` on it."""
    from kmec.pipeline import compile_spec, load_inputs

    t0 = time.perf_counter()
    compile_spec(spec_path, out=build)
    compile_s = time.perf_counter() - t0
    inputs = load_inputs(build)
    lm = load_model(inputs.model)
    edited = copy.deepcopy(lm.model)
    apply(inputs.artifact, edited, fingerprint=lm.facts.fingerprint)
    t0 = time.perf_counter()
    report = verify(inputs.spec, inputs.plan, lm.model, edited, lm.tok, artifact=inputs.artifact)
    seconds = time.perf_counter() - t0
    loc = [c for c in report.claims if c.metric == "locality"]
    sample = max((c.sample or 0) for c in inputs.spec.claims if c.metric == "locality")
    return {"spec": str(spec_path.relative_to(ROOT)), "edits": len(inputs.spec.edits),
            "sample": sample, "seconds": seconds, "compile_s": compile_s,
            "locality_prompts": sum(c.n for c in loc), "items_scored": report.timing["items_scored"],
            "timing": report.timing, "summary": report.summary}


def _write(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{text}{END}"
    if BEGIN in doc and END in doc:
        doc = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _m: block, doc, flags=re.DOTALL)
    else:
        doc = doc.rstrip("\n") + f"\n\n## Verification\n\n{block}\n"
    path.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--spec", type=Path, default=ROOT / "specs" / "examples" / "capitals.kmec")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-budget", action="store_true")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m")
    items = bench_prompts(args.prompts)
    sc = bench_scoring(lm.model, lm.tok, items, args.rounds)
    print(f"scoring {sc['n']} items ({sc['tokens']} tokens): batched {sc['batched_s']:.2f} s, "
          f"one at a time {sc['single_s']:.2f} s, {sc['speedup']:.1f}x, max diff {sc['max_diff']:.1e}")
    bud = None
    if not args.skip_budget:
        with tempfile.TemporaryDirectory(prefix="kmec-bench-") as tmp:
            bud = bench_budget(args.spec.resolve(), Path(tmp) / "build")
        print(f"verify {bud['spec']}: {bud['edits']} edits, locality sample {bud['sample']}/edit: "
              f"{bud['seconds']:.1f} s ({bud['locality_prompts']} locality probes, "
              f"{bud['items_scored']} items scored); {bud['timing']}")
        print(bud["summary"])
    if args.write:
        cmd = "python benchmarks/bench_verify.py " + " ".join(sys.argv[1:])
        machine = (f"Command: `{cmd.strip()}` · {dt.date.today().isoformat()} · "
                   f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY="
                   f"{os.environ.get('OMP_WAIT_POLICY')}; SmolLM2-135M fp32 on CPU.")
        lines = [machine, "", "| measurement | result | target |", "|---|---|---|",
                 (f"| scoring {sc['n']} prompts ({sc['tokens']} tokens), batched | "
                  f"{sc['batched_s']:.2f} s | |"),
                 f"| same prompts one at a time | {sc['single_s']:.2f} s | |",
                 f"| speed-up | **{sc['speedup']:.1f}×** | ≥ 5× |",
                 f"| max difference batched vs single | {sc['max_diff']:.1e} | ≤ 1e-4 |"]
        if bud:
            lines.append(f"| `verify` of `{bud['spec']}` (compiled): {bud['edits']} edits, locality "
                         f"sample {bud['sample']} per edit ({bud['locality_prompts']} probes, "
                         f"{bud['items_scored']} unique items scored) | **{bud['seconds']:.1f} s** "
                         f"| < 60 s |")
        lines += ["", ("Both scorers run in the same process, interleaved round by round "
                       "(best of rounds). The machine is shared: absolute times vary with load; "
                       "the ratio is the result."), "",
                  ("Where the batched scorer's time goes: rows are sorted by length and a batch "
                   "is closed before a quarter of it would be padding; an item whose tokens are "
                   f"a prefix of another's (corpus-sentence prefixes, a bare prompt and the same "
                   f"prompt with its target) is read from the longer row ({sc['n']} items -> "
                   f"{sc['rows']} rows here); the unembedding runs only on the positions read, "
                   "one GEMM per group of rows. `kmec verify` sets OMP_WAIT_POLICY=PASSIVE "
                   "(unless set): on this shared 2-core machine spinning OpenMP threads made "
                   "verification 3-10x slower under load."), ""]
        _write("\n".join(lines))


if __name__ == "__main__":
    main()
