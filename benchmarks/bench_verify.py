"""Benchmark verification on the embedded model (SmolLM2-135M).

    .venv/bin/python benchmarks/bench_verify.py [--prompts 200] [--rounds 2]
        [--edits 12] [--sample 200] [--threads N] [--write]

(a) Scoring: the same prompts (locality-style bare prompts and prompt +
    target pairs, as ``kmec verify`` scores them) through
    ``kmec.verify.scoring.score_items`` in padded batches, and one prompt at a
    time, interleaved round by round in one process so CPU contention from
    other work hits both alike. Target: batched ≥ 5× faster; the two must
    agree within 1e-4.
(b) Budget: a full ``kmec.verify.verify`` of a spec with ``--edits`` capital
    edits (rank-one deltas on the last MLP, made here so the benchmark does not
    depend on the compiler) and a locality claim of ``--sample`` drawn prompts
    per edit, plus efficacy and generality claims. Target: < 60 s after the
    model is loaded.

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
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kmec.artifacts import apply, build_artifact  # noqa: E402
from kmec.backends.base import LowRank  # noqa: E402
from kmec.models.hooks import Trace  # noqa: E402
from kmec.models.load import load_model  # noqa: E402
from kmec.planner.model import EditRequest, Plan, Step  # noqa: E402
from kmec.spec import Claim, Relation, Spec, TripleEdit  # noqa: E402
from kmec.verify import canaries, verify  # noqa: E402
from kmec.verify.scoring import Item, score_items  # noqa: E402

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
    tokens = sum(len(tok(it.prompt + (" " + it.target if it.target else ""))["input_ids"])
                 for it in items)
    return {"n": len(items), "tokens": tokens, "batched_s": tb, "single_s": ts,
            "speedup": ts / tb, "max_diff": diff}


def crude_edit(model, tok, prompt: str, new: str, layer: int) -> LowRank:
    """Rank-one delta on the last MLP: the prompt's key maps to the new target's
    embedding direction (a C = I 'ROME'; enough to move the edit prompt)."""
    path = f"model.layers.{layer}.mlp.down_proj"
    ids = tok(prompt)["input_ids"]
    with torch.no_grad(), Trace(model, path, retain_input=True) as tr:
        logits = model(torch.tensor([ids])).logits[0, -1]
    k = tr.input[0, -1].double()
    emb = model.get_input_embeddings().weight.double()
    new_id = tok(" " + new, add_special_tokens=False)["input_ids"][0]
    u = emb[new_id] - emb[int(logits.argmax())]
    u = 8.0 * u / u.norm()
    return LowRank(f"{path}.weight", u[:, None].float(), (k / (k @ k))[:, None].float())


def bench_budget(lm, n_edits: int, sample: int) -> dict:
    model, tok = lm.model, lm.tok
    rel = Relation(name="capital", prompt=TEMPLATES[0], paraphrases=TEMPLATES[1:],
                   subjects=NEIGHBOURS)
    lang = Relation(name="language", prompt="The official language of {{ subject }} is")
    edits = tuple(TripleEdit(name=s.lower(), subject=s, relation="capital", old=old, new=new,
                             preserve=(f"The currency of {s} is the",))
                  for s, old, new in CAPITALS[:n_edits])
    claims = (Claim(metric="efficacy", threshold=1.0), Claim(metric="generality", threshold=0.5),
              Claim(metric="locality", threshold=0.9, sample=sample, kl=0.5))
    spec = Spec(model="smollm2-135m", relations=(rel, lang), edits=edits, claims=claims)
    layer = lm.facts.n_layers - 1
    reqs, payloads = [], []
    for e in edits:
        prompt = f"The capital of {e.subject} is"
        reqs.append(EditRequest(name=e.name, prompt=prompt, subject=e.subject, target_new=e.new,
                                target_old=e.old,
                                scope=tuple(t.replace("{{ subject }}", e.subject) for t in TEMPLATES[1:])))
        payloads.append(crude_edit(model, tok, prompt, e.new, layer))
    plan = Plan(kmec_version="bench", spec_hash="0" * 64, model="smollm2-135m",
                model_fingerprint=lm.facts.fingerprint, model_arch=lm.facts.arch, seed=0,
                order="batch", steps=(Step(id="s00-bench", backend="bench", edits=tuple(reqs)),))
    art = build_artifact([("s00-bench", payloads)], base_model="smollm2-135m",
                         base_fingerprint=lm.facts.fingerprint, base_arch=lm.facts.arch,
                         weight_layout="out_in", plan_hash=plan.sha256)
    edited = copy.deepcopy(model)
    apply(art, edited, fingerprint=lm.facts.fingerprint)
    t0 = time.perf_counter()
    report = verify(spec, plan, model, edited, tok, seed=0, artifact=art)
    seconds = time.perf_counter() - t0
    loc = [c for c in report.claims if c.metric == "locality"]
    return {"edits": n_edits, "sample": sample, "seconds": seconds,
            "locality_prompts": sum(c.n for c in loc), "items_scored": report.timing["items_scored"],
            "timing": report.timing, "summary": report.summary}


def _write(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{text}{END}"
    if BEGIN in doc and END in doc:
        doc = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _m: block, doc, flags=re.S)
    else:
        doc = doc.rstrip("\n") + f"\n\n## Verification\n\n{block}\n"
    path.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--edits", type=int, default=12)
    ap.add_argument("--sample", type=int, default=200)
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
        bud = bench_budget(lm, args.edits, args.sample)
        print(f"verify {bud['edits']} edits, locality sample {bud['sample']}/edit: "
              f"{bud['seconds']:.1f} s ({bud['locality_prompts']} locality probes, "
              f"{bud['items_scored']} items scored); {bud['timing']}")
        print(bud["summary"])
    if args.write:
        cmd = "python benchmarks/bench_verify.py " + " ".join(sys.argv[1:])
        lines = [f"Command: `{cmd.strip()}` · {dt.date.today().isoformat()} · "
                 f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} torch threads; SmolLM2-135M fp32 on CPU.", "",
                 "| measurement | result | target |", "|---|---|---|",
                 f"| scoring {sc['n']} prompts ({sc['tokens']} tokens), batched | "
                 f"{sc['batched_s']:.2f} s | |",
                 f"| same prompts one at a time | {sc['single_s']:.2f} s | |",
                 f"| speed-up | **{sc['speedup']:.1f}×** | ≥ 5× |",
                 f"| max difference batched vs single | {sc['max_diff']:.1e} | ≤ 1e-4 |"]
        if bud:
            lines.append(f"| `verify`: {bud['edits']} edits, locality sample {bud['sample']} per "
                         f"edit ({bud['locality_prompts']} probes, {bud['items_scored']} unique "
                         f"items scored) | **{bud['seconds']:.1f} s** | < 60 s |")
        lines += ["", "Both scorers are run in the same process, interleaved round by round "
                  "(best of rounds). The machine is shared: absolute times vary with load; the "
                  "ratio is the result.", ""]
        _write("\n".join(lines))


if __name__ == "__main__":
    main()
