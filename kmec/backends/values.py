"""Shared math: the target change δ of an MLP output that makes the model say the target.

Contents:
    ValueParams        steps, lr, KL weight, weight decay, norm clamp, early stop
    ValueCache         finished chunks of δ on disk, keyed by their content
    chunk_bounds()     content-defined chunks of about ``edit_batch`` edits
    optimise_deltas()  δ per edit at one layer's MLP output (batched over edits)

For each edit, δ ∈ R^{d_model} is added to the output of ``mlp_out`` at
``layer`` at the subject's last token, under every context prefix, and found
by minimising (ROME, Meng et al. 2022, eq. 4; MEMIT eq. 16)::

    L(δ) = [nll(prompt) + w · mean_s nll(scope_s) + w_b · mean_b nll(borrowed_b)] / (1 + w + w_b)
           + kl_weight · KL(P₀(· | "{subject} is a") ‖ P(· | "{subject} is a"; δ))
           + weight_decay · ‖δ‖² / ‖v₀‖²
    nll(p) = mean_prefixes −log P(target | prefix + p; δ)

where the scope prompts are the edit's declared in-scope prompts (the
relation's paraphrases and the edit's ``scope``), each with δ added at the
subject's last token in *that* prompt (its last token for an edit without a
subject), under the same prefixes, and ``w = scope_weight`` (0: the edit
prompt alone, as in the papers; with no scope prompts the objective is the
papers' exactly). The borrowed prompts are wordings that other edits of the
relation declare (:mod:`kmec.planner.passes.share_scope`), with ``w_b =
borrowed_weight``; a term is left out (its weight 0) when an edit has none. An edit
named in ``scope_boost`` has ``w = scope_weight · boost`` (compile's ``broaden`` repair,
:mod:`kmec.planner.repair`); an edit named in ``push`` stops at that target probability
instead of ``stop_prob`` and may take twice ``steps`` to get there (compile's
``optimise`` repair), the others are unchanged.

with ``‖δ‖ ≤ clamp · ‖v₀‖`` enforced after every step, where v₀ is the MLP
output at that position. The KL term on the "essence" prompt keeps what the
model believes about the subject otherwise. Edits are optimised together in
one batch; since each δᵢ only affects its own rows and Adam is elementwise,
this equals optimising them one by one, just faster. An edit stops moving once
its target's mean token probability passes ``stop_prob``, and its rows leave
the batch, so later steps only run the edits still being optimised.

The optimisation is by far the most expensive part of a ROME/MEMIT/AlphaEdit
step (95 % of a 1,000-edit MEMIT batch), and it depends only on the weights,
the layer, the chunk's edits, the prefixes and these parameters — not on the
layer range below the top layer, λ, the statistics or the other chunks. A
:class:`ValueCache` keeps each chunk's result under a hash of exactly those
inputs, so changing λ or the layer range, or adding, removing or changing a
few edits of a spec, re-optimises only the chunks whose inputs changed
(chunk boundaries are set by the edits' content, :func:`chunk_bounds`); a hit
returns the bytes a recomputation would give on the same device.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kmec._version import __version__
from kmec.backends.keys import build_batch, declared_prompts, request_shares
from kmec.hashing import atomic_write_bytes, canonical_json, sha256_text
from kmec.models.adapters import ArchAdapter
from kmec.models.hooks import Trace, device_of, hidden_of, replay_below
from kmec.models.load import native_bf16
from kmec.models.prefix_kv import PrefixKV, align_at, cache_kwarg, forward_suffix
from kmec.planner.model import EditRequest


class ValueParams(BaseModel):
    """Hyper-parameters of the δ optimisation (defaults tuned on SmolLM2-135M)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = 25
    lr: float = 1.0  # 0.5 until 2026-12-03: 1.0 takes ~30 % fewer steps (see BENCHMARKS.md)
    kl_weight: float = 0.0625
    weight_decay: float = 0.5
    clamp: float = 4.0
    stop_prob: float = 0.9
    essence: str = "{subject} is a"
    edit_batch: int = 16  # edits optimised together, on average (see chunk_bounds)
    scope_weight: float = 1.0  # weight of the declared in-scope prompts against the edit prompt
    # weight of the wordings borrowed from sibling edits (EditRequest.borrowed), a term of
    # their own so that they do not dilute the edit's declared scope prompts
    borrowed_weight: float = 0.5
    # edit name -> factor on scope_weight for that edit alone: the compile loop's `broaden`
    # rung raises it for edits whose declared scope prompts fail their generality claim.
    # Only the chunks that hold a boosted edit change their cache key; left out of the
    # dump when empty, so plans without a boost keep their bytes.
    scope_boost: dict[str, float] = Field(default_factory=dict, exclude_if=lambda v: not v)
    # edit name -> a stricter stop_prob for that edit alone, reached in up to 2·steps: the
    # compile loop's `optimise` rung sets it for edits whose own prompt still fails. Like
    # scope_boost: keyed per edit in the cache, left out of the dump when empty.
    push: dict[str, float] = Field(default_factory=dict, exclude_if=lambda v: not v)
    # precision of the blocks above the edited layer during the optimisation: "auto" is
    # bfloat16 where the device computes it natively (CUDA; CPUs with AMX or AVX-512 bf16),
    # else the model's own; δ, Adam's state and the loss stay in float32 either way. On an
    # AVX-512 bf16 CPU bf16 made a ROME edit 2.6x faster and kept the ROME 200 table within
    # one point (BENCHMARKS.md), MEMIT's 1,000-edit batch took 17.7 min with its table
    # within one point, and the README demo held all 42 checks; on an AVX2-only CPU bf16
    # ran 7x slower, so "auto" stays float32 there. The weights therefore depend on the
    # machine's bf16 units as well as on the plan: the same plan gives the same weights on
    # the same kind of machine; the build records which (Runtime.bf16_units), and the step
    # cache, keyed by the runtime, keeps the two kinds apart. "float32" takes them out of it.
    compute: Literal["auto", "float32", "bfloat16"] = "auto"
    # wordings of its question drawn from the model for each edit that declares no scope
    # prompt (kmec.backends.wordings), trained on as borrowed wordings. 0 (the default
    # here, MEMIT's and AlphaEdit's) draws none and is left out of the dump; ROME's
    # default is 3 (RomeParams).
    wordings: int = Field(default=0, ge=0, le=8, exclude_if=lambda v: not v)


# Bump when the optimisation's arithmetic changes, so stale cached δ are not reused.
_ALGORITHM = 4
log = logging.getLogger("kmec")


@dataclass(frozen=True)
class ValueCache:
    """Finished δ chunks under ``root/values/<key>.safetensors``.

    Attributes:
        root: the backends' cache folder (``$KMEC_HOME/backends``).
        weights: identifies the weights the model holds while optimising —
            the base model's fingerprint, or for a step that runs on earlier
            steps' edits a hash of that history. Entries never cross weights.
    """

    root: Path
    weights: str

    def key(self, device: torch.device, dtype: torch.dtype, site: str, edits: Sequence[EditRequest],
            prefixes: Sequence[str], params: ValueParams, seed: int, compact: bool,
            compute: torch.dtype | None = None) -> str:
        """Hash of everything one chunk's δ depends on (``edit_batch`` only shapes chunks)."""
        return sha256_text(canonical_json({
            "kmec": __version__, "algorithm": _ALGORITHM, "weights": self.weights,
            "device": device.type, "dtype": str(dtype), "compute": str(compute or dtype),
            "site": site, "seed": seed,
            "compact": compact, "prefixes": list(prefixes),
            "params": params.model_dump(mode="json",
                                        exclude={"edit_batch", "scope_boost", "push"}),
            # the scope prompts are in the objective: a chunk whose edits declare other
            # scope prompts must not reuse δ (they were left out of the key until 0.x)
            # (and which of them are borrowed: they are weighted apart)
            "edits": [[e.prompt, e.subject, e.target_new,
                       *(["scope", *e.scope] if e.scope else []),
                       *(["borrowed", *e.borrowed] if e.borrowed else []),
                       *(["boost", params.scope_boost[e.name]]
                         if e.name in params.scope_boost else []),
                       *(["push", params.push[e.name]] if e.name in params.push else [])]
                      for e in edits]}))

    def _path(self, key: str) -> Path:
        return Path(self.root) / "values" / f"{key}.safetensors"

    def load(self, key: str, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached (δ [n, d], probability [n]), or None when absent or unusable."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        path = self._path(key)
        if not path.exists():
            return None
        try:
            t = load(path.read_bytes())
            delta, prob = t["delta"], t["prob"]
        except (OSError, KeyError, SafetensorError) as e:
            log.warning("ignoring an unreadable cached value %s (%s)", path, e)
            return None
        if delta.ndim != 2 or delta.shape[0] != n or prob.shape != (n,) \
                or not bool(torch.isfinite(delta).all()):
            log.warning("ignoring a malformed cached value %s", path)
            return None
        return delta, prob

    def store(self, key: str, delta: torch.Tensor, prob: torch.Tensor) -> None:
        """Write one chunk atomically."""
        from safetensors.torch import save

        atomic_write_bytes(self._path(key), save({"delta": delta.detach().cpu().contiguous(),
                                                  "prob": prob.detach().cpu().contiguous()}))


def value_cache(cache_dir: Path | None, weights: str) -> ValueCache | None:
    """The cache for an ``ExecContext``'s ``cache_dir`` and ``weights`` (None if either is unset)."""
    return ValueCache(Path(cache_dir), weights) if cache_dir is not None and weights else None


def chunk_bounds(edits: Sequence[EditRequest], size: int) -> list[slice]:
    """Split ``edits`` into chunks of about ``size`` edits, with boundaries set by content.

    A chunk ends after an edit whose hash is divisible by ``size // 2`` once
    the chunk holds at least ``size // 2`` edits, and at the latest at
    ``2 · size`` edits (content-defined chunking, as rsync and backup tools
    do). Inserting, removing or changing an edit anywhere in a spec thus
    changes only the chunks around it, and the :class:`ValueCache` keeps
    every other chunk; fixed-size chunks would shift every chunk after it.

    >>> es = [EditRequest(name=str(i), prompt=f"p{i}", subject=None, target_new="t")
    ...       for i in range(100)]
    >>> bounds = chunk_bounds(es, 16)
    >>> sum(b.stop - b.start for b in bounds), all(8 <= b.stop - b.start <= 32 for b in bounds[:-1])
    (100, True)
    >>> chunk_bounds(es[:3], 1)
    [slice(0, 1, None), slice(1, 2, None), slice(2, 3, None)]
    """
    low = max(size // 2, 1)
    out, start = [], 0
    for i, e in enumerate(edits):
        n = i + 1 - start
        h = int(sha256_text(canonical_json([e.prompt, e.subject, e.target_new]))[:8], 16)
        if (n >= low and h % low == 0) or n >= 2 * size:
            out.append(slice(start, i + 1))
            start = i + 1
    if start < len(edits):
        out.append(slice(start, len(edits)))
    return out


def compute_dtype(model: Any, compute: str) -> torch.dtype:
    """The dtype ``compute`` ("auto", "float32", "bfloat16") resolves to for ``model``."""
    own = next(model.parameters()).dtype
    if compute == "auto":
        return torch.bfloat16 if own == torch.float32 and native_bf16(device_of(model)) else own
    return getattr(torch, compute)


def compute_model(model: Any, dtype: torch.dtype) -> Any:
    """``model`` itself when it already holds ``dtype``, else a copy in ``dtype`` (the
    original is never cast)."""
    if next(model.parameters()).dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def _essence_edits(edits: Sequence[EditRequest], template: str) -> list[EditRequest]:
    out = []
    for e in edits:
        subj = e.subject or e.prompt.split()[-1]
        out.append(EditRequest(name=e.name, prompt=template.format(subject=subj), subject=subj,
                               target_new=e.target_new))
    return out


def optimise_deltas(
    model: Any,
    tok: Any,
    adapter: ArchAdapter,
    layer: int,
    edits: Sequence[EditRequest],
    prefixes: Sequence[str],
    params: ValueParams,
    *,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    compact: bool = True,
    cache: ValueCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (δ [n, d_model], final target probability [n]) for ``edits``.

    The model's weights are not modified: δ is added to the edited layer's stored
    output while the blocks up to that layer are temporarily replaced by a replay of it
    (:func:`~kmec.models.hooks.replay_below`; put back when the optimisation ends).
    ``compact=False`` keeps finished edits' rows in every forward pass (the
    same result, slower; the baseline of ``benchmarks/bench_values.py``).
    With ``cache``, chunks optimised before on the same weights are reused
    and new ones are stored; the caller vouches that the model holds the
    weights ``cache.weights`` names.
    """
    param = next(model.parameters())
    site = adapter.site("mlp_out", layer)
    cdtype = compute_dtype(model, params.compute)
    run: list[Any] = []  # the model in cdtype, made when the first chunk must be optimised
    deltas, probs = [], []
    reused = 0
    for sl in chunk_bounds(edits, params.edit_batch):
        chunk = edits[sl]
        key = hit = None
        if cache is not None:
            key = cache.key(param.device, param.dtype, site, chunk, prefixes, params, seed, compact,
                            cdtype)
            hit = cache.load(key, len(chunk))
        if hit is not None:
            d, p = (t.to(param.device) for t in hit)
            reused += len(chunk)
        else:
            if not run:
                if cdtype != param.dtype:
                    log.info("target values: blocks above layer %d in %s (value.compute %s); "
                             "δ, Adam and the loss in float32", layer,
                             str(cdtype).removeprefix("torch."), params.compute)
                run.append(compute_model(model, cdtype))
            # reports its edits as they reach the target, not all at its end
            d, p = _optimise_chunk(model, run[0], cdtype, tok, adapter, layer, chunk, prefixes,
                                   params, seed, compact, progress)
            if cache is not None and key is not None:
                cache.store(key, d, p)
        if hit is not None and progress:
            progress(len(chunk))
        deltas.append(d)
        probs.append(p)
    if reused:
        log.info("target values: %d of %d edits reused from the cache", reused, len(edits))
    return torch.cat(deltas), torch.cat(probs)


def _optimise_chunk(model, run, cdtype, tok, adapter, layer, edits, prefixes, params, seed,
                    compact, progress=None):
    device = device_of(model)
    torch.manual_seed(seed)
    prompts, owner_list, main_list = declared_prompts(edits, params.scope_weight)
    rw = build_batch(tok, prompts, prefixes, with_targets=True, device=device)
    ess = build_batch(tok, _essence_edits(edits, params.essence), [""], with_targets=False,
                      device=device)
    n, n_prompts = len(edits), len(prompts)
    owner = torch.tensor(owner_list, device=device)  # request -> edit
    main = torch.tensor(main_list, device=device)  # edit -> its own prompt's request
    # a request is the edit's own prompt, one of its declared scope prompts, or a wording
    # borrowed from a sibling edit: its NLL counts with its share of the edit's objective
    share = request_shares(edits, prompts, owner_list, main_list, params.scope_weight,
                           params.borrowed_weight, params.scope_boost).to(device)

    rows_all = torch.cat([owner[rw.edit_index], ess.edit_index])  # row -> edit
    look_all = torch.cat([rw.lookup, ess.lookup])
    width = max(rw.input_ids.shape[1], ess.input_ids.shape[1])
    pad_id = tok.pad_token_id or 0
    ids = torch.cat([_pad(rw.input_ids, width, pad_id), _pad(ess.input_ids, width, pad_id)])
    mask = torch.cat([_pad(rw.attention_mask, width, 0), _pad(ess.attention_mask, width, 0)])
    n_rw = rw.input_ids.shape[0]
    ess_rows = n_rw + torch.arange(n, device=device)
    ess_last = ess.attention_mask.sum(1) - 1

    # One pass without gradients up to the edited layer, in the model's own precision:
    # the layer's output at every row (the blocks below never see δ, so the steps run
    # only the blocks above it, see replay_below) and v₀, the MLP output at the bare
    # prompt's lookup position (the first prefix is "").
    block: dict[str, Any] = {}

    def keep_block(output: Any, _path: str) -> Any:
        block["out"] = output
        return output

    with torch.no_grad(), Trace(model, adapter.site("mlp_out", layer), retain_output=True) as mt, \
            Trace(model, adapter.site("layer", layer), edit_output=keep_block, stop=True):
        model.base_model(input_ids=ids, attention_mask=mask)
    first_rows = main * len(prefixes)
    # δ and the bookkeeping live on the inputs' device; a device_map may put the edited
    # layer and the head elsewhere, so indices go to them and their results come back
    out = mt.output
    v0 = out[first_rows.to(out.device), rw.lookup[first_rows].to(out.device)].float().to(device)
    v0_norm = v0.norm(dim=-1).clamp_min(1e-6)
    lower = hidden_of(block["out"]).detach().float()
    template = block.pop("out")
    # Each row shifted so that its δ position lands on one column: nothing before that
    # column depends on δ, so the upper blocks' keys/values there are computed once here
    # and each step runs only the columns from it on (see kmec.models.prefix_kv).
    al = align_at(ids, mask, look_all, pad_id)
    lower = al.place(lower)
    sfx = al.split  # first column of the part the steps run
    prefix = PrefixKV.compute(run, adapter.layers, layer, template, al,
                              lower[:, :sfx].to(cdtype))
    kwarg = cache_kwarg(run.base_model)

    body, head = run.base_model, run.get_output_embeddings()
    delta = torch.zeros(n, v0.shape[-1], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=params.lr)

    t_rows = torch.tensor([r for r, _, _ in rw.target_pos], device=device)
    t_pos = torch.tensor([p for _, p, _ in rw.target_pos], device=device)
    t_tok = torch.tensor([t for _, _, t in rw.target_pos], device=device)
    t_req = rw.edit_index[t_rows]  # target token -> request
    t_edit = owner[t_req]
    t_pos = t_pos + al.shift[t_rows] - sfx  # positions in the steps' columns
    ess_last = ess_last + al.shift[ess_rows] - sfx
    tokens_per_req = torch.zeros(n_prompts, device=device).index_add_(
        0, t_req, torch.ones_like(t_req, dtype=torch.float))

    # Finished edits leave the batch: their δ is frozen and their rows cannot
    # affect other edits' rows, so only the unfinished edits' rows are run
    # (trimmed to their longest row), which makes later steps cheaper.
    cur: dict[str, torch.Tensor] = {}
    pkv: dict[str, PrefixKV] = {}

    def select(active: torch.Tensor) -> None:
        keep = active[rows_all].nonzero()[:, 0]
        new_row = torch.full((ids.shape[0],), -1, dtype=torch.long, device=device)
        new_row[keep] = torch.arange(keep.numel(), device=device)
        t_keep = active[t_edit]
        w = sfx + int(al.suffix_lengths()[keep].max())
        cur.update(ids=al.ids[keep, sfx:w], mask=al.mask[keep, :w], pos=al.pos[keep, sfx:w],
                   lower=lower[keep.to(lower.device), sfx:w],
                   rows=torch.arange(keep.numel(), device=device),
                   look=torch.zeros_like(keep), edit_of_row=rows_all[keep],
                   t_rows=new_row[t_rows[t_keep]],
                   t_pos=t_pos[t_keep], t_tok=t_tok[t_keep], t_req=t_req[t_keep],
                   ess_rows=new_row[ess_rows[active]], ess_last=ess_last[active],
                   edits=active.nonzero()[:, 0])
        pkv["now"] = prefix.select(keep)

    def residual() -> torch.Tensor:
        """The edited layer's output with δ added at the lookup positions (summed in fp32)."""
        add = torch.zeros_like(cur["lower"])
        at = add.device
        add[cur["rows"].to(at), cur["look"].to(at)] = delta[cur["edit_of_row"]].to(at)
        return (cur["lower"] + add).to(cdtype)

    # each edit's own early stop and step limit (``push``: stricter, and twice the steps)
    stop = torch.tensor([params.push.get(e.name, params.stop_prob) for e in edits], device=device)
    limit = torch.tensor([params.steps * (2 if e.name in params.push else 1) for e in edits],
                         device=device)
    last = int(limit.max()) if n else 0
    kl_base = torch.zeros(n, 0, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    final_p = torch.zeros(n, device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    select(active)
    stored: dict[str, torch.Tensor] = {}
    reported = 0  # edits passed to ``progress`` so far
    with replay_below(run, adapter.layers, layer, template, lambda: stored["h"]):
        for step in range(last):
            opt.zero_grad()
            stored["h"] = residual()
            h = forward_suffix(body, cur["ids"], cur["mask"], cur["pos"], pkv["now"], kwarg)
            edits_now = cur["edits"]
            hd = h.device
            # one product with the (large) output head for the target and essence positions
            at_rows = torch.cat([cur["t_rows"], cur["ess_rows"]]).to(hd)
            at_pos = torch.cat([cur["t_pos"], cur["ess_last"]]).to(hd)
            logp_all = head(h[at_rows, at_pos]).float().log_softmax(-1).to(device)
            n_t = cur["t_rows"].shape[0]
            logits_t, ess_logp = logp_all[:n_t], logp_all[n_t:]
            logp = logits_t.gather(1, cur["t_tok"][:, None])[:, 0]
            # per request: mean over its target tokens under every prefix; per edit: the
            # requests' NLL weighted by their shares (its own prompt alone: share 1)
            per_req = torch.zeros(n_prompts, device=device).index_add_(0, cur["t_req"], -logp) \
                / tokens_per_req.clamp_min(1)
            nll = torch.zeros(n, device=device).index_add_(0, owner, share * per_req)[edits_now]
            if step == 0:
                kl_base = ess_logp.detach()
            kl = torch.nn.functional.kl_div(ess_logp, kl_base[edits_now], log_target=True,
                                            reduction="none").sum(-1)
            decay = params.weight_decay * (delta[edits_now].norm(dim=-1) ** 2) \
                / (v0_norm[edits_now] ** 2)
            per_edit = nll + params.kl_weight * kl + decay
            final_p[edits_now] = torch.exp(-nll.detach())
            done = done | (final_p >= stop)
            if progress is not None and int(done.sum()) > reported:
                progress(int(done.sum()) - reported)  # the edits that reached their target
                reported = int(done.sum())
            done = done | (step >= limit - 1)  # out of steps: frozen as it is
            if bool(done.all()) or step == last - 1:
                break
            loss = (per_edit * (~done[edits_now]).float()).sum()
            loss.backward()
            frozen = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                delta[done] = frozen[done]  # Adam's momentum must not move finished edits
                max_norm = params.clamp * v0_norm
                norms = delta.norm(dim=-1)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12),
                                    torch.ones_like(norms))
                delta.mul_(scale[:, None])
            if compact and bool((active & done).any()):
                active = ~done
                select(active)
    d = delta.detach()
    if not torch.isfinite(d).all():
        raise FloatingPointError("the value optimisation produced NaN/inf")
    if progress is not None and n > reported:
        progress(n - reported)  # the edits that ran out of steps
    return d, final_p


def _pad(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], 1)


def mean_token_prob(nll: float) -> float:
    """exp(−mean NLL): the geometric-mean probability of the target tokens."""
    return math.exp(-nll)
