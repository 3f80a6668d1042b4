"""Training a MEND editor on edit records, with resumable checkpoints.

Contents:
    TrainConfig     steps, batch, learning rates, loss weights, checkpointing (frozen pydantic)
    DataInfo        the training file: path, sha256, dataset, record counts
    TrainResult     the saved editor's manifest and network
    train_editor()  train (or resume), evaluate on held-out records, save the editor
    evaluate()      efficacy / paraphrase / locality of single edits on records

One training step (Mitchell et al. 2022, Alg. 1), for a batch of B records
each edited *independently* (row r of a pass runs with its own ΔW_r, see
:func:`kmec.backends.mend.edit.edited`):

1. one pass of the unedited model on the edit rows ``prompt + target``: the
   factors (u, δ) of −log P(target) at every edited layer, and the base
   log-probabilities of the unrelated and text rows;
2. the editor maps (u, δ) to (ũ, −α δ̃), i.e. ΔW_ℓ = −α_ℓ Σ_t δ̃_t ũ_tᵀ;
3. one pass with the edits on the edit, rephrase, unrelated and text rows::

       L = c_edit · mean_{edit, rephrase rows} −log P_edited(target)
         + c_loc  · mean_{unrelated rows, scored positions} KL(P_base ‖ P_edited)
         + c_text · mean_{text rows, scored positions} KL(P_base ‖ P_edited)

   (the unrelated row is the record's own: zsRE ``loc`` + ``loc_ans``,
   CounterFact's neighbourhood prompt; the text row a snippet of ordinary
   prose from kmec's statistics corpus, scored every third token — without
   it the edits left the unrelated prompts alone but raised the perplexity
   of ordinary text by 20–30 %);
4. backpropagate L through ΔW into the editor's parameters (Adam).

Before the first step, the shared step α is calibrated on one batch by a
line search over powers of ten (the identity editor is then plain
feature-normalised gradient descent with the best step), so training does not
depend on a hand-set α for each model. The batch order is a seeded
permutation per epoch, and a checkpoint (network, optimiser, running
statistics, loss curve, elapsed time) is written every ``checkpoint_every``
steps, so an interrupted run resumes exactly where it stopped; a run with the
same model, data, layers and settings but more ``steps`` continues an earlier
one.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kmec._version import __version__
from kmec.backends.mend.checkpoint import Run, checkpoint_dir, load_checkpoint, save_checkpoint
from kmec.backends.mend.edit import (
    TEXT,
    base_pass,
    edited,
    editor_factors,
    group_factors,
    row_kl,
    row_nll,
    same_argmax,
    scored_logp,
    token_accuracy,
    tokenize,
)
from kmec.backends.mend.lower import LowerCache, collect_lower, skipping_lower
from kmec.backends.mend.model import EditorConfig, EditorNet
from kmec.backends.mend.records import EditRecord, text_snippets
from kmec.backends.mend.store import EditorManifest, save_editor
from kmec.hashing import canonical_json, sha256_text
from kmec.models.adapters import adapter_for
from kmec.models.facts import ModelFacts
from kmec.models.hooks import device_of
from kmec.progress import Progress

log = logging.getLogger("kmec")
EVAL_TEXT_SEED = 1_000_003  # ordinary-text snippets for evaluation (training uses the run's seed)
ALPHA_GRID = tuple(10.0 ** (e / 2) for e in range(-14, 1))  # 1e-7 .. 1 in half-decades


class TrainConfig(BaseModel):
    """How an editor is trained (defaults: SmolLM2-135M on 2 CPU cores in < 30 minutes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(default=1000, ge=0)
    batch: int = Field(default=4, ge=1)         # records per step
    group: int = Field(default=4, ge=1)  # every other step sums this many edits into one ΔW
    lr: float = Field(default=2e-4, gt=0)       # Adam, editor network
    lr_alpha: float = Field(default=1e-2, ge=0)  # Adam, log α per layer
    c_edit: float = 1.0
    c_loc: float = 1.0
    c_text: float = 4.0
    text_pool: int = Field(default=1024, ge=1)  # snippets of ordinary text (text_snippets)
    grad_clip: float = 10.0
    max_len: int = 96
    seed: int = 0
    skip_lower: bool = True  # cache the blocks below the edited layers (see lower.py)
    checkpoint_every: int = Field(default=50, ge=1)
    log_every: int = Field(default=25, ge=1)
    editor: EditorConfig = EditorConfig()

    def run_key(self, **inputs: Any) -> str:
        """Hash of everything a resumed run must share with the run it continues."""
        same = self.model_dump(mode="json", exclude={"steps", "checkpoint_every", "log_every",
                                                            "skip_lower"})
        return sha256_text(canonical_json({"config": same, **inputs}))


@dataclass(frozen=True)
class DataInfo:
    """The training file as the manifest records it."""

    path: str
    sha256: str
    dataset: str
    records: int
    train: int
    held_out: int


@dataclass
class TrainResult:
    """A finished run: the saved editor and where training started from."""

    manifest: EditorManifest
    net: EditorNet
    resumed_from: int


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def batch_indices(step: int, n: int, batch: int, seed: int) -> list[int]:
    """Record indices of training step ``step`` (0-based): a seeded permutation per epoch.

    >>> batch_indices(0, 5, 2, 0) + batch_indices(1, 5, 2, 0) + batch_indices(2, 5, 2, 0)[:1]
    [2, 1, 0, 4, 3]
    """
    out = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(pos, n)
        out.append(_permutation(n, seed, epoch)[i])
    return out


def _layout(tok: Any, recs: Sequence[EditRecord], ids: Sequence[int], texts: Sequence[str],
            max_len: int, device: Any = "cpu"):
    """Rows ``[edit × B, rephrase × k, unrelated × B, text × B]`` of one batch.

    Returns the rows, the edit each row belongs to, ``n_scored`` (edit and
    rephrase rows come first), the rows the base pass needs (all but the
    rephrases) and each row's cache key (``ids`` are the records' indices,
    ``texts`` one snippet of ordinary text per record).
    """
    b = len(recs)
    reph = [i for i, r in enumerate(recs) if r.rephrase]
    rows = tokenize(tok, [(r.prompt, r.target) for r in recs]
                    + [(recs[i].rephrase, recs[i].target) for i in reph]
                    + [(r.loc, r.loc_ans) for r in recs] + [(t, TEXT) for t in texts],
                    max_len=max_len, device=device)
    keys = ([(i, "edit") for i in ids] + [(ids[i], "rephrase") for i in reph]
            + [(i, "loc") for i in ids] + [("text", t) for t in texts])
    row_edit = torch.tensor([*range(b), *reph, *range(b), *range(b)], device=device)
    n_scored = b + len(reph)
    base_idx = torch.cat([torch.arange(b), torch.arange(n_scored, n_scored + 2 * b)]).to(device)
    return rows, row_edit, n_scored, base_idx, keys


def _cache_rows(records: Sequence[EditRecord], texts: Sequence[str]) -> list[tuple[Any, str, Any]]:
    """Every (key, prompt, target) row the training batches can contain."""
    out: list[tuple[Any, str, Any]] = [(("text", t), t, TEXT) for t in dict.fromkeys(texts)]
    for i, r in enumerate(records):
        out.append(((i, "edit"), r.prompt, r.target))
        if r.rephrase:
            out.append(((i, "rephrase"), r.rephrase, r.target))
        out.append(((i, "loc"), r.loc, r.loc_ans))
    return out


def _texts_for(ids: Sequence[int], step: int, pool: Sequence[str]) -> list[str]:
    """One snippet of ordinary text per record of step ``step`` (cycling through ``pool``)."""
    return [pool[(step * len(ids) + j) % len(pool)] for j in range(len(ids))]


def _losses(model, tok, adapter, layers, net, records, ids, texts, config, *, train: bool,
            cache: LowerCache | None = None, group: int = 1):
    """(loss, metrics) for the batch ``records[ids]``; see the module docstring.

    ``group`` > 1 sums each run of ``group`` edits into one ΔW that all of
    their rows see (edits applied together); 1 edits every record alone.
    """
    recs = [records[i] for i in ids]
    device = device_of(model)
    rows, row_edit, n_scored, base_idx, keys = _layout(tok, recs, ids, texts, config.max_len,
                                                       device)
    b, first = len(recs), min(layers)
    hidden = cache.batch(keys, rows.input_ids.shape[1]) if cache is not None else None
    base_rows = rows.select(base_idx)
    with skipping_lower(model, adapter, first, None if hidden is None else hidden[base_idx]):
        base = base_pass(model, adapter, layers, base_rows, torch.arange(b, device=device))
    factors = group_factors(editor_factors(net, layers, base, rows.active[:b], observe=train),
                            group)
    with skipping_lower(model, adapter, first, hidden), \
            edited(model, adapter, factors, row_edit // group):
        logp = scored_logp(model, rows)
    nll = row_nll(logp, rows)
    kl = {}  # base rows: [edit, loc, text] (b each); edited rows: [edit, rephrase, loc, text]
    for name, base_lo, lo in (("loc_kl", b, n_scored), ("text_kl", 2 * b, n_scored + b)):
        kl[name] = row_kl(base.logp[base_rows.in_rows(base_lo, base_lo + b)],
                          logp[rows.in_rows(lo, lo + b)], rows.select(slice(lo, lo + b))).mean()
    loss = (config.c_edit * nll[:n_scored].mean() + config.c_loc * kl["loc_kl"]
            + config.c_text * kl["text_kl"])
    with torch.no_grad():
        metrics = {"loss": float(loss), "edit_nll": float(nll[:n_scored].mean()),
                   **{k: float(v) for k, v in kl.items()}, "pre_nll": float(base.nll[:b].mean()),
                   "edit_acc": float(token_accuracy(logp, rows)[:b].mean())}
    return loss, metrics


@torch.no_grad()
def _calibrate(model, tok, adapter, layers, net, records, ids, texts, config, cache) -> float:
    """Set every layer's α to the power of ten (in half-decades) with the lowest batch loss."""
    best, best_loss = net.config.alpha, math.inf
    for a in ALPHA_GRID:
        net.log_alpha.fill_(math.log(a))
        loss, _ = _losses(model, tok, adapter, layers, net, records, ids, texts, config,
                          train=False, cache=cache)
        if float(loss) < best_loss:
            best, best_loss = a, float(loss)
    net.log_alpha.fill_(math.log(best))
    log.info("mend: calibrated step α = %.3g (batch loss %.4f)", best, best_loss)
    return best


def _optimizer(net: EditorNet, config: TrainConfig) -> torch.optim.Adam:
    rest = [p for n, p in net.named_parameters() if n != "log_alpha"]
    return torch.optim.Adam([{"params": rest, "lr": config.lr},
                             {"params": [net.log_alpha], "lr": config.lr_alpha}])


def _lower_cache(model, tok, adapter, layers, net, records, ids, pool, config,
                 progress) -> LowerCache | None:
    """Cache the lower blocks' output for every training row, if skipping them is exact here."""
    cache = collect_lower(model, tok, adapter, min(layers), _cache_rows(records, pool),
                          max_len=config.max_len, progress=progress)
    with torch.no_grad():
        texts = _texts_for(ids, 0, pool)
        full, _ = _losses(model, tok, adapter, layers, net, records, ids, texts, config,
                          train=False)
        fast, _ = _losses(model, tok, adapter, layers, net, records, ids, texts, config,
                          train=False, cache=cache)
    if not torch.allclose(full, fast, rtol=1e-4, atol=1e-5):
        log.warning("mend: skipping the lower blocks changes the loss (%.6f vs %.6f) on this "
                    "architecture; training with full forward passes (slower)", full, fast)
        return None
    return cache


def _loop(model, tok, adapter, layers, net, opt, run: Run, records, pool, config: TrainConfig,
          ckpt: Path, cache: LowerCache | None, progress: Progress | None) -> None:
    """Train from ``run.step`` to ``config.steps``, logging and checkpointing as it goes."""
    start, t_start = run.step, time.perf_counter()
    t0 = t_start - run.seconds
    net.train()
    while run.step < config.steps:
        ids = batch_indices(run.step, len(records), config.batch, config.seed)
        texts = _texts_for(ids, run.step, pool)
        group = config.group if run.step % 2 else 1  # alternate: edits alone, edits together
        loss, metrics = _losses(model, tok, adapter, layers, net, records, ids, texts, config,
                                train=True, cache=cache, group=group)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        opt.step()
        run.step += 1
        run.seconds = time.perf_counter() - t0
        point = run.record({**metrics, "alpha": float(net.log_alpha.detach().exp().mean())},
                           config.log_every)
        if point:
            rate = (run.step - start) / max(time.perf_counter() - t_start, 1e-9)
            log.info("mend step %d/%d: loss %.4f (edit NLL %.4f, KL unrelated %.4f, text %.4f), "
                     "%.2f steps/s, ETA %.0f s", run.step, config.steps, point["loss"],
                     point["edit_nll"], point["loc_kl"], point["text_kl"], rate,
                     (config.steps - run.step) / rate)
        if run.step % config.checkpoint_every == 0:
            save_checkpoint(ckpt, net, opt, run)
        if progress:
            progress(f"loss {metrics['loss']:.3f} (edit {metrics['edit_nll']:.3f}, "
                     f"loc {metrics['loc_kl']:.4f})", run.step, config.steps)
    run.flush()
    save_checkpoint(ckpt, net, opt, run)


def train_editor(
    model: Any,
    tok: Any,
    facts: ModelFacts,
    records: Sequence[EditRecord],
    *,
    layers: Sequence[int],
    config: TrainConfig | None = None,
    data: DataInfo,
    held_out: Sequence[EditRecord] = (),
    extra_eval: Mapping[str, Sequence[EditRecord]] | None = None,
    resume: bool = True,
    progress: Progress | None = None,
) -> TrainResult:
    """Train an editor for ``layers`` of ``model`` on ``records`` and save it.

    Args:
        model, tok, facts: the base model (never modified), its tokenizer and facts.
        records: training records.
        layers: edited layers (MLP output projections).
        config: training settings (default: ``TrainConfig()``).
        data: provenance of the records, written to the manifest.
        held_out: records not trained on; efficacy on them goes into the metrics.
        extra_eval: more named record sets to score (``metrics["eval"][name]``).
        resume: continue the checkpoint of an identical earlier run when there is one.
        progress: ``progress(message, done, total)`` after every step.

    Returns:
        The saved editor's manifest and network.
    """
    if not records:
        raise ValueError("no training records")
    config = config or TrainConfig()
    layers = tuple(sorted(layers))
    adapter = adapter_for(facts.model_type)
    t0 = time.perf_counter()
    run_key = config.run_key(fingerprint=facts.fingerprint, layers=list(layers), data=data.sha256,
                             train=len(records))
    ckpt = checkpoint_dir(facts.fingerprint, run_key)
    torch.manual_seed(config.seed)
    net = EditorNet(facts.d_mlp, facts.d_model, len(layers), config.editor, seed=config.seed)
    net.to(device_of(model))
    opt = _optimizer(net, config)
    run = load_checkpoint(ckpt, net, opt) if resume else None
    start = run.step if run else 0
    first_ids = batch_indices(start, len(records), config.batch, config.seed)
    pool = text_snippets(config.text_pool, seed=config.seed)
    cache = _lower_cache(model, tok, adapter, layers, net, records, first_ids, pool, config,
                         progress) if config.skip_lower else None
    if run is None:
        run = Run()
        net.train()
        texts = _texts_for(first_ids, 0, pool)
        with torch.no_grad():  # the first batch initialises the running statistics
            _losses(model, tok, adapter, layers, net, records, first_ids, texts, config,
                    train=True, cache=cache)
        run.alpha0 = _calibrate(model, tok, adapter, layers, net, records, first_ids, texts,
                                config, cache)
    else:
        log.info("mend: resuming from step %d (%s)", start, ckpt)
    setup = time.perf_counter() - t0
    _loop(model, tok, adapter, layers, net, opt, run, records, pool, config, ckpt, cache,
          progress)
    t1 = time.perf_counter()
    net.eval()
    sets = {"held_out": (held_out, 1), **{name: (recs, 1) for name, recs in (extra_eval or {}).items()}}
    if config.group > 1:
        sets["held_out_together"] = (held_out, config.group)
    scores = {name: {**evaluate(model, tok, facts, layers, net, recs, max_len=config.max_len,
                                group=g, progress=progress), "group": g}
              for name, (recs, g) in sets.items() if recs}
    manifest = EditorManifest(
        kmec_version=__version__, model=facts.name, fingerprint=facts.fingerprint,
        model_type=facts.model_type, layers=layers,
        params=tuple(f"{adapter.site('mlp_out', layer)}.weight" for layer in layers),
        d_in=facts.d_mlp, d_out=facts.d_model, config=config.editor,
        training=config.model_dump(mode="json"),
        metrics={"steps": run.step, "seconds": round(run.seconds, 1),
                 "setup_seconds": round(setup, 1),
                 "eval_seconds": round(time.perf_counter() - t1, 1), "alpha0": run.alpha0,
                 "curve": run.curve or [], "data": data.__dict__,
                 "held_out": scores.pop("held_out", {}),
                 "held_out_together": scores.pop("held_out_together", {}), "eval": scores})
    manifest = save_editor(net, manifest)
    return TrainResult(manifest=manifest, net=net, resumed_from=start)


def evaluate(model: Any, tok: Any, facts: ModelFacts, layers: Sequence[int], net: EditorNet,
             records: Sequence[EditRecord], *, batch: int = 8, max_len: int = 96,
             group: int = 1, progress: Progress | None = None) -> dict[str, float]:
    """Edit each record alone (or ``group`` consecutive records together) and score it.

    All scores are means over records; with ``group`` > 1 each record is scored
    on the model carrying its group's summed edit.

    Returns:
        ``efficacy`` (target token accuracy on the edit prompt after the edit;
        ``efficacy_before`` before it), ``top1`` (every target token is the
        argmax), ``prob_up`` (the target became more likely), ``paraphrase``
        (token accuracy on the rephrase; ``paraphrase_before``), ``locality``
        (share of the unrelated prompt's scored positions whose argmax is
        unchanged), ``loc_kl``, ``text_kl`` (KL on a snippet of ordinary text),
        ``ppl_ratio`` (edited / base perplexity of those snippets) and ``n``.
    """
    adapter = adapter_for(facts.model_type)
    device = device_of(model)
    pool = text_snippets(len(records), seed=EVAL_TEXT_SEED)
    batch = group * max(1, batch // group)
    sums: dict[str, float] = {}
    n_para = 0
    for start in range(0, len(records), batch):
        recs = records[start:start + batch]
        b = len(recs)
        rows, row_edit, n_scored, _, _ = _layout(tok, recs, range(b), pool[start:start + b],
                                                 max_len, device)
        base = base_pass(model, adapter, layers, rows, torch.arange(b, device=device))
        with torch.no_grad():
            factors = group_factors(editor_factors(net, layers, base, rows.active[:b]), group)
            with edited(model, adapter, factors, row_edit // group):
                logp = scored_logp(model, rows)
        for k, v in _scores(base, logp, rows, b, n_scored).items():
            sums[k] = sums.get(k, 0.0) + v
        n_para += n_scored - b
        if progress:
            progress("held-out edits", start + b, len(records))
    n = len(records)
    out = {k: round(v / (n_para if k.startswith("paraphrase") else n), 4) if n else 0.0
           for k, v in sums.items() if not k.startswith("paraphrase") or n_para}
    out["ppl_ratio"] = round(math.exp(out.pop("text_dnll", 0.0)), 4)
    return {**out, "n": n}


def _scores(base: Any, logp: torch.Tensor, rows: Any, b: int, n_scored: int) -> dict[str, float]:
    """Sums over one batch's records of every :func:`evaluate` score."""
    acc0, acc1 = token_accuracy(base.logp, rows), token_accuracy(logp, rows)
    nll1 = row_nll(logp, rows)
    out = {"efficacy": acc1[:b].sum(), "efficacy_before": acc0[:b].sum(),
           "top1": (acc1[:b] == 1).sum(), "prob_up": (nll1[:b] < base.nll[:b]).sum(),
           "paraphrase": acc1[b:n_scored].sum(), "paraphrase_before": acc0[b:n_scored].sum()}
    for name, lo in (("loc", n_scored), ("text", n_scored + b)):
        at = rows.in_rows(lo, lo + b)
        part = rows.select(slice(lo, lo + b))
        out[f"{name}_kl"] = row_kl(base.logp[at], logp[at], part).sum()
        if name == "loc":
            out["locality"] = same_argmax(base.logp[at], logp[at], part).sum()
    text = slice(n_scored + b, n_scored + 2 * b)
    out["text_dnll"] = (nll1[text] - base.nll[text]).sum()
    return {k: float(v) for k, v in out.items()}
