"""Constrained fine-tuning (``ft``): train the MLP output projections of the step's
layers on the edit prompts, with a hard bound on the weight change.

Contents:
    FinetuneParams      steps, lr, norm bound, KL weight, LoRA rank, early stop, seed
    Finetune            the backend (``name = "ft"``)
    preserve_prompts()  the KL anchors of one edit (declared, or the fallback below)
    project()           scale a delta back onto the ball ‖Δ‖_F ≤ bound

For each layer l of the step, the parameter W_l of ``mlp_out`` (the MLP down
projection) gets a trainable change Δ_l, found by Adam on::

    L(Δ) = mean_edits mean_{x ∈ {prompt} ∪ scope} −(1/|t|) log P(t | x; Δ)
           + kl_weight · mean_{y ∈ preserve} KL(P₀(· | y) ‖ P(· | y; Δ))

(t: the target's tokens, scored with the leading space the tokenizer puts
after a prompt; P₀: the unedited model). After every optimiser step each Δ_l
is projected onto ``‖Δ_l‖_F ≤ max_delta · ‖W_l‖_F`` — a hard bound that holds
exactly for the returned payloads. (FT-L, Zhu et al. 2020, the ROME paper's
fine-tuning baseline, bounds each entry instead; kmec bounds the Frobenius
norm relative to the weight, the measure the spec's ``max_delta`` and the
other backends use, so one number means the same on every model size.)

Training stops early when every edit's target is the greedy continuation of
its prompt (every target token the argmax, teacher-forced) with
geometric-mean probability at least ``stop_prob`` and, with
``stop_on_scope``, the greedy continuation of each of its scope prompts too.
A prompt that already meets its condition adds no NLL to the step (so the
change stays as small as the targets allow), until it stops meeting it. At
most ``kl_batch`` preserve prompts enter each step, taken in turn.

Preserve prompts. The edit's declared ``preserve`` prompts are the KL
anchors, with the step's ``protect`` prompts (the listed neighbours a locality
claim samples: the rest of the declared locality set). An edit that declares none gets anchors that probe what the edit is
most likely to break: its prompt with the subject replaced by each of
``n_neighbours`` well-known entities (same relation, other subject: the
"neighbourhood" that fine-tuning over-generalises to) plus ROME's essence
prompt ``"{subject} is a"`` (what the model otherwise believes about the
subject). A free-form edit without a subject gets a fixed set of generic
factual prompts instead.

LoRA. With ``lora_rank = r > 0`` the change is parametrised as
``Δ = B Aᵀ`` (B: [out, r], zero at the start; A: [in, r], seeded random), in
plain torch — no ``peft`` dependency is needed for one low-rank factor pair
per matrix — and returned as an exact, compact ``LowRank(u=B, v=A)`` payload;
the projection rescales B so that ``‖B Aᵀ‖_F ≤ bound``. With ``r = 0`` every
entry of W is trained and the payload is ``Dense`` in the parameter's storage
layout (``[in, out]`` for GPT-2's Conv1D).

The model is never written: Δ enters through forward hooks on the edited
modules (``y += x Δᵀ``), and gradients are taken with ``torch.autograd.grad``
with respect to Δ only, so not even the model's ``.grad`` fields change.
Learning rates are relative: one Adam step moves each entry by about
``lr · rms(W)``, i.e. the whole matrix by about ``lr · ‖W‖_F``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from kmec.artifacts.payloads import Dense, LowRank, Payload
from kmec.backends.base import ExecContext
from kmec.backends.keys import context_prefixes
from kmec.errors import BackendError
from kmec.models.batching import right_pad
from kmec.models.facts import ModelFacts
from kmec.models.hooks import TraceDict, device_of, hidden_of, with_hidden
from kmec.models.tokens import target_text
from kmec.planner import costs
from kmec.planner.backend_info import BackendInfo, Work
from kmec.planner.model import EditRequest, Step

# Stand-in subjects for the fallback neighbourhood: well known, and of several
# kinds (people, places, organisations), so "the <relation> of X" makes sense
# for most relations.
NEIGHBOURS = ("Albert Einstein", "France", "Microsoft", "William Shakespeare", "Tokyo",
              "the Amazon River", "Barack Obama", "Germany")
ESSENCE = "{subject} is a"
# Anchors for a free-form edit that names no subject.
GENERIC_PRESERVE = (
    "The capital of France is",
    "The Eiffel Tower is located in",
    "The first president of the United States was",
    "Water is made of hydrogen and",
    "The author of Hamlet is",
    "The largest planet in the solar system is",
    "The currency of Japan is the",
    "Albert Einstein was born in",
)
# Project slightly inside the ball, with norms in float64, so that float32
# rounding (and another process's reduction order) never puts Δ outside it.
MARGIN = 1.0 - 1e-5


class FinetuneParams(BaseModel):
    """Constrained fine-tuning hyper-parameters (the layers come from the step).

    Defaults tuned on SmolLM2-135M with CounterFact records (docs/backends.md).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(default=40, ge=1)  # at most this many Adam steps
    lr: float = Field(default=0.02, gt=0)  # relative: each step moves W by ~lr·‖W‖_F
    max_delta: float = Field(default=0.02, gt=0)  # ‖Δ‖_F ≤ max_delta·‖W‖_F (spec: max_delta)
    kl_weight: float = Field(default=5.0, ge=0)  # weight of KL(P₀ ‖ P) on preserve prompts
    lora_rank: int = Field(default=0, ge=0)  # 0: full fine-tune of the chosen matrices
    stop_prob: float = Field(default=0.5, ge=0, le=1)  # early stop: greedy and prob ≥ this
    stop_on_scope: bool = True  # early stop also waits for the scope prompts to be greedy
    n_prefixes: int = Field(default=0, ge=0)  # also train on the prompt after seeded prefixes
    prefix_len: int = Field(default=6, ge=1)
    n_neighbours: int = Field(default=4, ge=0, le=len(NEIGHBOURS))  # fallback KL anchors
    kl_batch: int = Field(default=64, ge=1)  # preserve prompts per step, taken in turn
    batch_rows: int = Field(default=32, ge=1)  # prompts per forward/backward (memory bound)
    seed: int | None = None  # None: the plan's seed


def preserve_prompts(edit: EditRequest, n_neighbours: int) -> tuple[str, ...]:
    """The KL anchors of ``edit`` (see the module docstring for the fallback).

    >>> e = EditRequest(name="x", prompt="The capital of Spain is", subject="Spain",
    ...                 target_new="Lyon")
    >>> preserve_prompts(e, 2)
    ('The capital of Albert Einstein is', 'The capital of France is', 'Spain is a')
    >>> preserve_prompts(e.model_copy(update={"preserve": ("Rome is in",)}), 2)
    ('Rome is in',)
    """
    if edit.preserve:
        return edit.preserve
    subject = edit.subject
    if not subject or subject not in edit.prompt:
        return GENERIC_PRESERVE
    swapped = [edit.prompt.replace(subject, other) for other in NEIGHBOURS if other != subject]
    return (*swapped[:n_neighbours], ESSENCE.format(subject=subject))


def project(norm: float, bound: float) -> float:
    """Factor that brings a delta of Frobenius norm ``norm`` inside ``‖Δ‖ ≤ bound``.

    >>> project(1.0, 2.0), round(project(4.0, 2.0), 4), 4.0 * project(4.0, 2.0) < 2.0
    (1.0, 0.5, True)
    """
    if norm <= bound * MARGIN:
        return 1.0
    return bound * MARGIN / norm


# ---------------------------------------------------------------- trainable deltas


@dataclass
class _Delta:
    """The trainable change of one parameter: dense (storage layout) or B Aᵀ (math layout)."""

    param: str
    layout: str
    w_norm: float  # ‖W‖_F of the unedited parameter
    bound: float  # max_delta · ‖W‖_F
    dense: torch.Tensor | None = None
    b: torch.Tensor | None = None  # [out, r]
    a: torch.Tensor | None = None  # [in, r]

    def tensors(self) -> list[torch.Tensor]:
        return [self.dense] if self.dense is not None else [self.b, self.a]

    def add(self, x: torch.Tensor) -> torch.Tensor:
        """The change of the module's output for input ``x``."""
        xf = x.float()
        if self.dense is not None:
            return xf @ (self.dense if self.layout == "in_out" else self.dense.T)
        return (xf @ self.a) @ self.b.T

    def norm(self) -> float:
        if self.dense is not None:
            return float(self.dense.detach().double().norm())
        b, a = self.b.detach().double(), self.a.detach().double()
        bb, aa = b.T @ b, a.T @ a
        return math.sqrt(max(float(torch.trace(bb @ aa)), 0.0))

    @torch.no_grad()
    def project(self) -> None:
        """Scale back onto ``‖Δ‖_F ≤ bound`` (for LoRA: rescale B)."""
        scale = project(self.norm(), self.bound)
        if scale < 1.0:
            (self.dense if self.dense is not None else self.b).mul_(scale)

    def payload(self) -> Payload:
        if self.dense is not None:
            return Dense(self.param, self.dense.detach().clone())
        return LowRank(self.param, self.b.detach().clone(), self.a.detach().clone())


def _deltas(model: Any, adapter: Any, layers: Sequence[int], p: FinetuneParams,
            seed: int) -> tuple[dict[str, _Delta], list[dict[str, Any]]]:
    """Zero-initialised deltas for ``mlp_out`` at ``layers`` and their Adam param groups."""
    params = dict(model.named_parameters())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    deltas: dict[str, _Delta] = {}
    groups: list[dict[str, Any]] = []
    for layer in sorted(layers):
        path = adapter.site("mlp_out", layer)
        w = params[f"{path}.weight"]
        w_norm = float(w.detach().double().norm())
        d = _Delta(f"{path}.weight", adapter.weight_layout, w_norm, w_norm * p.max_delta)
        if p.lora_rank == 0:
            d.dense = torch.zeros(w.shape, device=w.device, requires_grad=True)
            groups.append({"params": [d.dense], "lr": p.lr * w_norm / math.sqrt(w.numel())})
        else:
            out_dim, in_dim = (w.shape[1], w.shape[0]) if d.layout == "in_out" else w.shape
            a = torch.randn(in_dim, p.lora_rank, generator=gen) / math.sqrt(in_dim)
            d.a = a.to(w.device).requires_grad_(True)
            d.b = torch.zeros(out_dim, p.lora_rank, device=w.device, requires_grad=True)
            groups.append({"params": [d.b], "lr": p.lr * w_norm / math.sqrt(out_dim * p.lora_rank)})
            groups.append({"params": [d.a], "lr": p.lr / math.sqrt(in_dim)})
        deltas[path] = d
    return deltas, groups


# ---------------------------------------------------------------- training rows


@dataclass
class _Row:
    """One prompt in the training batch."""

    ids: list[int]
    edit: int  # edit index (-1 for a KL row)
    weight: float  # multiplies the row's summed NLL (1/tokens folded in) or its KL
    targets: list[tuple[int, int]] = field(default_factory=list)  # (position, token) for NLL
    kl: int = -1  # index into the base log-probabilities for a KL row
    bare: bool = False  # the edit prompt itself
    index: int = -1  # position among the NLL rows


def _rows(tok: Any, edits: Sequence[EditRequest], prefixes: Sequence[str],
          p: FinetuneParams, protect: Sequence[str] = ()) -> tuple[list[_Row], list[_Row], list[str]]:
    """NLL rows (bare edit prompts first, in edit order, then the prefixed and
    scope prompts, shortest first) and KL rows (the unique preserve prompts, then the
    step's protected prompts, shortest first). Returns both and the KL prompts."""
    n = len(edits)
    bare, other = [], []
    for i, e in enumerate(edits):
        texts = [prefix + e.prompt for prefix in prefixes[1:]] + list(e.scope)
        weight = 1.0 / (n * (1 + len(texts)))
        for j, text in enumerate([e.prompt, *texts]):
            ctx = tok.encode(text, add_special_tokens=False)
            tgt = tok.encode(target_text(text, e.target_new), add_special_tokens=False)
            row = _Row(ctx + tgt[:-1], i, weight / len(tgt),
                       [(len(ctx) + k - 1, int(t)) for k, t in enumerate(tgt)], bare=j == 0)
            (bare if j == 0 else other).append(row)
    kl_prompts = list(dict.fromkeys([x for e in edits for x in preserve_prompts(e, p.n_neighbours)]
                                    + list(protect)))
    kl_rows = [_Row(tok.encode(x, add_special_tokens=False), -1, 0.0, kl=k)
               for k, x in enumerate(kl_prompts)] if p.kl_weight > 0 else []
    nll = [replace(r, index=k) for k, r in enumerate(bare + sorted(other, key=_length))]
    return nll, sorted(kl_rows, key=_length), kl_prompts  # sorted: less padding per chunk


def _length(row: _Row) -> int:
    return len(row.ids)


def _batch(rows: Sequence[_Row], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return right_pad([r.ids for r in rows], pad, device)


@torch.no_grad()
def _base_logprobs(model: Any, tok: Any, prompts: Sequence[str], batch: int) -> torch.Tensor:
    """log P₀(· | prompt) at each prompt's last token: [n, vocab] float32."""
    device = device_of(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for s in range(0, len(prompts), batch):
        rows = [_Row(tok.encode(x, add_special_tokens=False), -1, 0.0) for x in prompts[s:s + batch]]
        ids, mask = _batch(rows, pad, device)
        h = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(1) - 1
        out.append(model.get_output_embeddings()(h[torch.arange(len(rows), device=device), last])
                   .float().log_softmax(-1))
    return torch.cat(out) if out else torch.zeros(0)


# ---------------------------------------------------------------- the backend


FT_STEPS = 40  # constrained fine-tuning steps, at most (FinetuneParams.steps; early stop)


def _cost(step: Step, facts: ModelFacts, setup: bool) -> Work:
    """At most ``FT_STEPS`` forward+backward passes over the edit and scope prompts plus a
    KL forward over the preserve prompts, training one MLP output matrix per layer."""
    p, n, L = costs.model_params(facts), len(step.edits), max(len(step.layers), 1)
    prompts = sum(1 + len(e.scope) for e in step.edits)
    anchors = len(set(step.protect) | {x for e in step.edits for x in e.preserve}) or 5 * n
    per_step = min(anchors, FinetuneParams.model_fields["kl_batch"].default)
    secs = costs.seconds(FT_STEPS * (prompts * costs.FWD_BWD + 2 * per_step)
                         * costs.PROMPT_TOKENS, p)
    trained = L * facts.d_model * facts.d_mlp
    extra = costs.activations_mb(facts, prompts * costs.PROMPT_TOKENS) + trained * 4 * 3 / costs.MB
    return Work(secs, extra, (f"at most {FT_STEPS} steps over {prompts} prompts and {anchors} "
                              f"KL anchors {secs:.0f} s",))


INFO = BackendInfo(
    name="ft", changes="weights", layers="range", layer_role="memit",
    layer_note="constrained fine-tuning spreads its bounded change over MEMIT's range of "
    "mid-early MLPs, where subject-keyed facts are stored",
    uses=frozenset({"scope", "preserve", "locality"}), cost=_cost)


class Finetune:
    """Norm- and KL-constrained fine-tuning of the step's MLP output projections."""

    name: ClassVar[str] = "ft"
    info: ClassVar[BackendInfo] = INFO
    Params: ClassVar[type[BaseModel]] = FinetuneParams

    def default_params(self, facts: ModelFacts) -> FinetuneParams:
        return FinetuneParams()

    def execute(self, step: Step, ctx: ExecContext) -> Sequence[Payload]:
        p = FinetuneParams.model_validate(step.params)
        if not step.layers:
            raise BackendError("fine-tuning needs at least one layer", step_id=step.id)
        if not step.edits:
            return []
        model, tok = ctx.model, ctx.tok
        seed = ctx.seed if p.seed is None else p.seed
        prefixes = [""]
        if p.n_prefixes:
            prefixes = context_prefixes(model, tok, n=p.n_prefixes, length=p.prefix_len,
                                        seed=seed, cache_dir=ctx.cache_dir,
                                        fingerprint=ctx.facts.fingerprint)
        nll_rows, kl_rows, kl_prompts = _rows(tok, step.edits, prefixes, p, step.protect)
        base = _base_logprobs(model, tok, kl_prompts, p.batch_rows) if kl_rows else None
        deltas, groups = _deltas(model, ctx.adapter, step.layers, p, seed)
        trainer = _Trainer(model, tok, deltas, nll_rows, kl_rows, base, p, len(step.edits),
                           step.id)
        opt = torch.optim.Adam(groups)
        taken = 0
        for t in range(p.steps):
            opt.zero_grad(set_to_none=True)
            if trainer.pass_(t):
                break
            opt.step()
            for d in deltas.values():
                d.project()
            taken = t + 1
            if ctx.progress:
                ctx.progress("ft: training", taken, p.steps)
        else:
            trainer.pass_(p.steps, train=False)
        payloads = [d.payload() for d in deltas.values()]
        self._report(ctx, step, trainer, deltas, taken)
        return payloads

    @staticmethod
    def _report(ctx: ExecContext, step: Step, trainer: _Trainer, deltas: dict[str, _Delta],
                taken: int) -> None:
        probs = trainer.probs
        ratios = ", ".join(f"{d.norm() / d.w_norm:.4f}" for d in deltas.values())
        ctx.log.info("ft: %d steps, target prob min %.3f mean %.3f, ‖Δ‖/‖W‖ per layer %s",
                     taken, float(probs.min()), float(probs.mean()), ratios)
        missed = [e.name for e, ok in zip(step.edits, trainer.done.tolist()) if not ok]
        if missed:
            ctx.log.warning("ft: %d edit(s) not reached within %d steps and max_delta %g: %s",
                            len(missed), trainer.p.steps, trainer.p.max_delta,
                            ", ".join(missed[:10]))
        scope_missed = int((~trainer.reached).sum()) - len(missed)
        if scope_missed > 0:
            ctx.log.info("ft: %d scope prompt(s) do not yet continue with their target",
                         scope_missed)


class _Trainer:
    """One pass over the rows per optimiser step, in chunks of ``batch_rows``."""

    def __init__(self, model: Any, tok: Any, deltas: dict[str, _Delta], nll_rows: list[_Row],
                 kl_rows: list[_Row], base: torch.Tensor | None, p: FinetuneParams,
                 n_edits: int, step_id: str) -> None:
        self.model, self.deltas, self.base, self.p = model, deltas, base, p
        self.nll_rows, self.kl_rows, self.step_id = nll_rows, kl_rows, step_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.device = device_of(model)
        self.trainable = [t for d in deltas.values() for t in d.tensors()]
        n_bare = sum(r.bare for r in nll_rows)
        self.n_check = len(nll_rows) if p.stop_on_scope else n_bare
        self.reached = torch.zeros(len(nll_rows), dtype=torch.bool)
        self.done = torch.zeros(n_edits, dtype=torch.bool)
        self.probs = torch.zeros(n_edits)

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        holder: dict[str, TraceDict] = {}

        def edit(output: Any, path: str) -> Any:
            out = hidden_of(output)
            return with_hidden(output, out + self.deltas[path].add(holder["td"][path].input)
                               .to(out.dtype))

        with TraceDict(self.model, list(self.deltas), retain_input=True, detach=False,
                       edit_output=edit) as td:
            holder["td"] = td
            return self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state

    def pass_(self, t: int, *, train: bool = True) -> bool:
        """Accumulate gradients over all rows; True when every target is reached (stop).

        The NLL rows come first (bare edit prompts, then scope prompts), so
        once the chunk holding the last row the stopping rule reads is
        scored, the rule is known and, if it holds, the rest of the pass is
        skipped. ``train=False`` scores only the NLL rows.
        """
        rows = self.nll_rows + (self._kl_window(t) if train else [])
        for s in range(0, len(rows), self.p.batch_rows):
            chunk = rows[s:s + self.p.batch_rows]
            with torch.set_grad_enabled(train):
                loss = self._chunk_loss(chunk)
            if s < self.n_check <= s + len(chunk):
                stop = bool(self.reached[:self.n_check].all())
                if stop or not train:
                    return stop
            if not math.isfinite(float(loss.detach())):
                raise BackendError(
                    f"fine-tuning diverged: the loss is {float(loss.detach())} at step {t}",
                    step_id=self.step_id,
                    hint="lower `lr` (or `max_delta`), or load the model in float32")
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, self.trainable, allow_unused=True)
                for x, g in zip(self.trainable, grads):
                    if g is not None:
                        x.grad = g if x.grad is None else x.grad + g
        return False

    def _kl_window(self, t: int) -> list[_Row]:
        """Step ``t``'s preserve prompts: ``kl_batch`` of them, taken in turn, so
        every prompt is used once every ⌈n / kl_batch⌉ steps."""
        n = len(self.kl_rows)
        k = min(n, self.p.kl_batch)
        weight = self.p.kl_weight / max(k, 1)
        picked = sorted({(t * k + j) % n for j in range(k)}) if n else []
        return [replace(self.kl_rows[i], weight=weight) for i in picked]

    def _chunk_loss(self, chunk: Sequence[_Row]) -> torch.Tensor:
        ids, mask = _batch(chunk, self.pad, self.device)
        h = self._hidden(ids, mask)
        head = self.model.get_output_embeddings()
        loss = torch.zeros((), device=self.device)
        nll_rows = [(i, r) for i, r in enumerate(chunk) if r.kl < 0]
        if nll_rows:
            rr = torch.tensor([i for i, r in nll_rows for _ in r.targets], device=self.device)
            pos = torch.tensor([q for _, r in nll_rows for q, _ in r.targets], device=self.device)
            tgt = torch.tensor([t for _, r in nll_rows for _, t in r.targets], device=self.device)
            logp = head(h[rr, pos]).float().log_softmax(-1)
            tok_lp = logp.gather(1, tgt[:, None])[:, 0]
            greedy = logp.argmax(-1) == tgt
            start = 0
            for _, r in nll_rows:
                n = len(r.targets)
                lp = tok_lp[start:start + n]
                reached = bool(greedy[start:start + n].all())
                if r.bare:
                    prob = float(lp.detach().mean().exp())
                    reached = reached and prob >= self.p.stop_prob
                    self.probs[r.edit], self.done[r.edit] = prob, reached
                self.reached[r.index] = reached
                if not reached:  # a reached prompt adds nothing: the change stays small
                    loss = loss - r.weight * lp.sum()
                start += n
        kl_rows = [(i, r) for i, r in enumerate(chunk) if r.kl >= 0]
        if kl_rows:
            idx = torch.tensor([i for i, _ in kl_rows], device=self.device)
            last = mask[idx].sum(1) - 1
            logp = head(h[idx, last]).float().log_softmax(-1)
            base = self.base[[r.kl for _, r in kl_rows]].to(logp.device)
            kl = torch.nn.functional.kl_div(logp, base, log_target=True, reduction="none").sum(-1)
            weights = torch.tensor([r.weight for _, r in kl_rows], device=self.device)
            loss = loss + (weights * kl).sum()
        return loss
