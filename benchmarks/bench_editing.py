"""CounterFact editing benchmark for the rank-one backends on the embedded model.

Protocol (ROME/MEMIT papers, probability comparison): for each record,
  efficacy      P(new) > P(true) on the rewrite prompt
  paraphrase    the same, averaged over the paraphrase prompts
  neighbourhood P(true) > P(new) averaged over the neighbourhood prompts
where P(x) is the mean per-token log-probability of " x" after the prompt.
The neighbourhood score of the *unedited* model is measured in the same run
as the baseline it is compared with.

``--protocol easyedit`` scores instead as EasyEdit does (teacher-forced token
accuracy, "token_em"), so that kmec is compared with it under the peer's own
rules; nothing beyond the edit is given to the compiler, so every scored
prompt is held out (ROME trains on wordings it draws from the model itself,
``value.wordings``, never on the record's paraphrases; ``--param
value.wordings=0`` turns that off):
  rewrite       share of the new target's tokens that are the edited model's
                argmax when the prompt and the target are fed together
  rephrase      the same on the *first* paraphrase prompt only
  locality      share of argmax tokens unchanged (edited vs unedited model) at
                the positions of the true target fed after each neighbourhood
                prompt, averaged over the neighbourhood prompts
Prompt and target are tokenised as one text ("prompt target"), as EasyEdit
does, and the argmax at each target position is compared.

Both CounterFact formats are read: the EasyEdit file (one rephrase, one
locality prompt with its own ground truth; the issue's 200 / 1,000 records)
and ROME's (two paraphrases, ten neighbourhood prompts that keep the edit's
true object; the default ``--data``).

  rome, ft, mend (default: one edit at a time on a fresh model):
      python benchmarks/bench_editing.py --method rome --n 200 --data EASYEDIT
      python benchmarks/bench_editing.py --method rome --n 200
      python benchmarks/bench_editing.py --method ft --n 200 --data EASYEDIT
      python benchmarks/bench_editing.py --method mend --n 200 --data EASYEDIT
  memit (default: all N edits in one batch):
      python benchmarks/bench_editing.py --method memit --n 1000 --data EASYEDIT
  any method, the other mode: --batch / --single
      python benchmarks/bench_editing.py --method ft --n 20 --batch --train-on-scope

``ft`` trains MEMIT's layers; ``mend`` needs an editor trained for the model
(``kmec train-editor``; it edits the editor's layers).

``--reuse-values`` keeps each chunk's target values (δ) in kmec's cache and
reuses them on the next run with the same records, top layer and value
parameters: a λ or layer-range sweep on a 1,000-edit batch then costs the
solves (minutes) instead of the δ optimisation (about an hour here). Times
per edit from such a run exclude the optimisation; the table's times come
from runs without it.

``--train-on-scope`` gives fine-tuning each record's paraphrases as scope and
its neighbourhood prompts as preserve prompts, as ``kmec import`` writes
them; paraphrase and neighbourhood then score prompts the edit was trained
on (without it they are held out).

with EASYEDIT = ../shared/data/counterfact_easyedit/counterfact-edit.json.

Statistics come from kmec's cache (computed on first use, not timed per edit).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from kmec.artifacts import apply, build_artifact
from kmec.backends import BACKENDS, get_backend
from kmec.backends.base import ExecContext
from kmec.cli.stats import parse_layers
from kmec.errors import StatsError
from kmec.models.adapters import adapter_for
from kmec.models.load import kmec_home, load_model
from kmec.models.tokens import joined_ids, target_text
from kmec.planner.layers import default_layers
from kmec.planner.model import EditRequest, StatsRequest, Step
from kmec.stats import DEFAULT_MAX_LEN, DEFAULT_TOKENS, provider

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact.json"


@torch.no_grad()
def mean_logprob(model, tok, pairs, batch=32):
    """Mean per-token log-probability of each target after its prompt (batched,
    rows of similar length together)."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out = [0.0] * len(pairs)
    for lp, i in zip(_mean_logprob_in_order(model, tok, [pairs[i] for i in order], batch), order):
        out[i] = lp
    return out


def _padded(rows, pad_id):
    """Token rows right-padded to one width: (ids, attention mask)."""
    ids = torch.full((len(rows), max(map(len, rows))), pad_id)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    return ids, mask


def _mean_logprob_in_order(model, tok, pairs, batch):
    out = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        rows, spans = [], []
        for prompt, target in chunk:
            ctx = tok.encode(prompt, add_special_tokens=False)
            tgt = tok.encode(target_text(prompt, target), add_special_tokens=False)
            rows.append(ctx + tgt)
            spans.append((len(ctx), len(tgt)))
        ids, mask = _padded(rows, tok.pad_token_id or 0)
        logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        for r, (start, n) in enumerate(spans):
            pos = torch.arange(start - 1, start - 1 + n)
            toks = ids[r, start:start + n]
            out.append(float(logp[r, pos, toks].mean()))
    return out


def normalise(rec):
    """One record of either CounterFact format as a plain dict.

    ROME format (``counterfact/counterfact.json``): ten neighbourhood prompts,
    each expected to keep the edit's true object. EasyEdit format
    (``counterfact_easyedit/counterfact-edit.json``): one rephrase and one
    locality prompt with its own ground truth.
    """
    if "requested_rewrite" in rec:
        rw = rec["requested_rewrite"]
        true = rw["target_true"]["str"]
        return {"subject": rw["subject"], "prompt": rw["prompt"].format(rw["subject"]),
                "new": rw["target_new"]["str"], "true": true,
                "paraphrases": list(rec["paraphrase_prompts"]),
                "neighbours": [(p, true) for p in rec["neighborhood_prompts"]]}
    return {"subject": rec["subject"], "prompt": rec["prompt"], "new": rec["target_new"],
            "true": rec["ground_truth"], "paraphrases": [rec["rephrase_prompt"]],
            "neighbours": [(rec["locality_prompt"], rec["locality_ground_truth"])]}


def scores(model, tok, records):
    """Efficacy, paraphrase and neighbourhood indicators per (normalised) record."""
    per_record = []
    for rec in records:
        new, true = rec["new"], rec["true"]
        pairs = [(p, x) for p in [rec["prompt"], *rec["paraphrases"]] for x in (new, true)]
        pairs += [(p, x) for p, answer in rec["neighbours"] for x in (new, answer)]
        per_record.append(pairs)
    flat = mean_logprob(model, tok, [pair for pairs in per_record for pair in pairs])
    res, at = [], 0
    for rec, pairs in zip(records, per_record):
        para, neigh = rec["paraphrases"], rec["neighbours"]
        lp, at = flat[at:at + len(pairs)], at + len(pairs)
        diff = [lp[2 * i] - lp[2 * i + 1] for i in range(len(pairs) // 2)]  # new − true
        res.append({"margin": diff[0], "efficacy": float(diff[0] > 0),
                    "paraphrase": sum(d > 0 for d in diff[1:1 + len(para)]) / max(len(para), 1),
                    "neighbourhood": sum(d < 0 for d in diff[1 + len(para):]) / max(len(neigh), 1)})
    return res


@torch.no_grad()
def argmax_tokens(model, tok, pairs, batch=32):
    """For each (prompt, target): the target's token ids and the model's argmax token at
    each target position, with "prompt target" tokenised as one text (EasyEdit's
    teacher-forced protocol; a space joins them unless the prompt ends in one)."""
    out = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        rows, spans = [], []
        for prompt, target in chunk:
            full, start = joined_ids(tok, prompt, target)
            rows.append(full)
            spans.append((start, len(full) - start))
        ids, mask = _padded(rows, tok.pad_token_id or 0)
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for r, (start, n) in enumerate(spans):
            out.append((ids[r, start:start + n].tolist(), pred[r, start - 1:start - 1 + n].tolist()))
    return out


def easyedit_scores(model, tok, records, before=None):
    """EasyEdit's rewrite / rephrase accuracy and, given the unedited model's argmax tokens
    (``before``, from a first call), locality; returns (rows, argmax tokens)."""
    pairs, spans = [], []
    for rec in records:
        start = len(pairs)
        pairs += [(rec["prompt"], rec["new"]), (rec["paraphrases"][0], rec["new"])]
        pairs += list(rec["neighbours"])
        spans.append((start, len(pairs)))
    toks = argmax_tokens(model, tok, pairs)
    rows = []
    for k, (a, b) in enumerate(spans):
        acc = [sum(x == y for x, y in zip(t, p)) / len(t) for t, p in toks[a:a + 2]]
        row = {"rewrite": acc[0], "rephrase": acc[1]}
        if before is not None:
            kept = [sum(x == y for x, y in zip(p0, p1)) / len(p0)
                    for (_, p0), (_, p1) in zip(before[a + 2:b], toks[a + 2:b])]
            row["locality"] = sum(kept) / len(kept)
        rows.append(row)
    return rows, toks


def request(rec, i, scope=False):
    extra = {}
    if scope:
        extra = {"scope": tuple(rec["paraphrases"]), "preserve": tuple(p for p, _ in rec["neighbours"])}
    return EditRequest(name=f"cf{i}", prompt=rec["prompt"], subject=rec["subject"],
                       target_new=rec["new"], target_old=rec["true"], **extra)


def mean(rows, key):
    return sum(r[key] for r in rows) / max(len(rows), 1)


def standard_error(rows, key):
    """Standard error of ``mean(rows, key)`` over records (sample standard deviation / √n).

    A column of per-record scores that are mostly 0 or 1 is noisy on 50 records (about
    ±0.07 at a mean of 0.5): two settings closer than about twice this are not told apart.

    >>> round(standard_error([{"x": 0.0}, {"x": 1.0}, {"x": 1.0}, {"x": 0.0}], "x"), 3)
    0.289
    """
    n = len(rows)
    if n < 2:
        return float("nan")
    m = mean(rows, key)
    return (sum((r[key] - m) ** 2 for r in rows) / (n - 1) / n) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=("rome", "memit", "ft", "mend"), default="rome")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--single", dest="batch", action="store_false", default=None,
                      help="one edit at a time on a fresh model (default except memit)")
    mode.add_argument("--batch", dest="batch", action="store_true",
                      help="all N edits in one step (default for memit)")
    ap.add_argument("--train-on-scope", action="store_true",
                    help="ft: train on the paraphrases, anchor the neighbourhood prompts")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--offset", type=int, default=0,
                    help="skip the first records (tune on records the table does not score)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                    help="override a backend parameter, e.g. --param max_delta=0.01 "
                         "or a nested one, --param value.lr=1.0")
    ap.add_argument("--layers", help="edit these layers instead of the planner's (e.g. 3-8 or 2,5,8)")
    ap.add_argument("--reuse-values", action="store_true",
                    help="reuse target values (δ) cached by an earlier run on the same records and "
                         "top layer, so trying another λ or layer range costs only the solves; "
                         "the time per edit then excludes the δ optimisation")
    ap.add_argument("--protocol", choices=("counterfact", "easyedit"), default="counterfact",
                    help="counterfact: probability comparison (ROME/MEMIT papers); easyedit: "
                         "EasyEdit's teacher-forced token accuracy, first paraphrase, argmax "
                         "locality on the neighbourhood prompts")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.data.is_file():  # a usage error, not a traceback after the model loads
        ap.error(f"--data {args.data}: no such file")
    torch.manual_seed(0)
    lm = load_model("smollm2-135m")
    adapter = adapter_for(lm.facts.model_type)
    records = [normalise(r) for r in json.loads(args.data.read_text())[args.offset:args.offset + args.n]]
    batch = args.method == "memit" if args.batch is None else args.batch
    if args.method == "rome" and batch:
        ap.error("rome edits one fact per step: use --single (or --method memit)")
    layers = default_layers(lm.facts, BACKENDS[args.method].info.layer_role).layers
    if args.layers:
        try:
            layers = parse_layers(args.layers)
        except StatsError as exc:
            ap.error(str(exc))
    stats = None
    if args.method in ("rome", "memit"):  # fine-tuning and MEND need no key statistics
        stats = provider(lm.model, lm.tok, lm.facts, adapter,
                         StatsRequest(layers=layers, tokens=DEFAULT_TOKENS, max_len=DEFAULT_MAX_LEN))
        for layer in layers:
            stats.second_moment(layer)  # fill the cache before timing
    backend = get_backend(args.method)
    params = backend.default_params(lm.facts).model_dump(mode="json")
    for kv in args.param:
        key, value = kv.split("=", 1)
        *path, last = key.split(".")  # value.lr=1.0 sets one field of a nested group
        node = params
        for part in path:
            node = node[part]
        node[last] = json.loads(value)
    t_start = time.perf_counter()

    def progress(message: str, done: int, total: int) -> None:  # batch mode: a line per chunk
        print(f"{message}: {done}/{total} ({time.perf_counter() - t_start:.0f} s)", flush=True)

    ctx = ExecContext(model=lm.model, tok=lm.tok, adapter=adapter, facts=lm.facts, stats=stats,
                      cache_dir=kmec_home() / "backends", seed=0,
                      weights=lm.facts.fingerprint if args.reuse_values else "",
                      progress=progress if batch else None)
    peer = args.protocol == "easyedit"
    if peer and args.train_on_scope:
        ap.error("--protocol easyedit scores held-out prompts: drop --train-on-scope")
    before = scores(lm.model, lm.tok, records)
    peer_before = easyedit_scores(lm.model, lm.tok, records)[1] if peer else []
    peer_after = []

    def peer_rows(recs, first):  # EasyEdit rows for recs, given the index of the first
        if not peer:
            return []
        sizes = [2 + len(r["neighbours"]) for r in records]
        at = sum(sizes[:first])
        ref = peer_before[at:at + sum(sizes[first:first + len(recs)])]
        return easyedit_scores(lm.model, lm.tok, recs, ref)[0]

    after, t_edit = [], 0.0
    if not batch:
        for i, rec in enumerate(records):
            step = Step(id=f"s{i}", backend=args.method, edits=(request(rec, i, args.train_on_scope),),
                        layers=layers, params=params)
            t = time.perf_counter()
            payloads = backend.execute(step, ctx)
            t_edit += time.perf_counter() - t
            art = build_artifact([(step.id, payloads)], base_model="smollm2-135m", base_fingerprint="",
                                 base_arch="", weight_layout=adapter.weight_layout, plan_hash="")
            handle = apply(art, lm.model, check=False)
            after += scores(lm.model, lm.tok, [rec])
            peer_after += peer_rows([rec], i)
            handle.revert()
            extra = (f" rephrase {mean(peer_after, 'rephrase'):.3f} locality "
                     f"{mean(peer_after, 'locality'):.3f}") if peer else ""
            print(f"{i + 1}/{len(records)} efficacy so far {mean(after, 'efficacy'):.3f} "
                  f"({t_edit / (i + 1):.2f} s/edit){extra}", flush=True)
    else:
        edits = tuple(request(r, i, args.train_on_scope) for i, r in enumerate(records))
        step = Step(id="s0", backend=args.method, edits=edits, layers=layers, params=params)
        t = time.perf_counter()
        payloads = backend.execute(step, ctx)
        t_edit = time.perf_counter() - t
        art = build_artifact([(step.id, payloads)], base_model="smollm2-135m", base_fingerprint="",
                             base_arch="", weight_layout=adapter.weight_layout, plan_hash="")
        handle = apply(art, lm.model, check=False)
        after = scores(lm.model, lm.tok, records)
        peer_after = peer_rows(records, 0)
        handle.revert()
    result = {"method": args.method, "n": len(records), "offset": args.offset, "data": str(args.data),
              "layers": list(layers), "params": args.param, "reuse_values": args.reuse_values,
              "mode": "batch" if batch else "single", "train_on_scope": args.train_on_scope,
              "efficacy": mean(after, "efficacy"), "paraphrase": mean(after, "paraphrase"),
              "neighbourhood": mean(after, "neighbourhood"),
              "neighbourhood_unedited": mean(before, "neighbourhood"),
              "efficacy_unedited": mean(before, "efficacy"),
              "seconds_total_edit": t_edit, "seconds_per_edit": t_edit / max(len(records), 1),
              "torch_threads": torch.get_num_threads(), "protocol": args.protocol}
    if peer:
        for k in ("rewrite", "rephrase", "locality"):
            result[f"easyedit_{k}"] = mean(peer_after, k)
            result[f"easyedit_{k}_se"] = standard_error(peer_after, k)
        result["easyedit_rewrite_unedited"] = mean(easyedit_scores(lm.model, lm.tok, records)[0],
                                                   "rewrite")
    print(json.dumps(result, indent=2))
    if args.json:  # with the per-record scores (margin: log P(new) − log P(true) on the prompt)
        result["records"] = [{"subject": r["subject"], "prompt": r["prompt"], "new": r["new"],
                              "true": r["true"], "before": b, "after": a}
                             for r, b, a in zip(records, before, after)]
        for row, easy in zip(result["records"], peer_after):  # EasyEdit's per-record scores
            row["easyedit"] = easy
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
