"""Shared math: the target change δ of an MLP output that makes the model say the target.

Contents:
    ValueParams        steps, lr, KL weight, weight decay, norm clamp, early stop
    optimise_deltas()  δ per edit at one layer's MLP output (batched over edits)

For each edit, δ ∈ R^{d_model} is added to the output of ``mlp_out`` at
``layer`` at the subject's last token, under every context prefix, and found
by minimising (ROME, Meng et al. 2022, eq. 4; MEMIT eq. 16)::

    L(δ) = mean_prefixes −log P(target | prefix + prompt; δ)
           + kl_weight · KL(P₀(· | "{subject} is a") ‖ P(· | "{subject} is a"; δ))
           + weight_decay · ‖δ‖² / ‖v₀‖²

with ``‖δ‖ ≤ clamp · ‖v₀‖`` enforced after every step, where v₀ is the MLP
output at that position. The KL term on the "essence" prompt keeps what the
model believes about the subject otherwise. Edits are optimised together in
one batch; since each δᵢ only affects its own rows and Adam is elementwise,
this equals optimising them one by one, just faster. An edit stops moving once
its target's mean token probability passes ``stop_prob``, and its rows leave
the batch, so later steps only run the edits still being optimised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from kmec.backends.keys import build_batch
from kmec.models.adapters import ArchAdapter
from kmec.models.hooks import Trace
from kmec.planner.model import EditRequest


class ValueParams(BaseModel):
    """Hyper-parameters of the δ optimisation (defaults tuned on SmolLM2-135M)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = 25
    lr: float = 0.5
    kl_weight: float = 0.0625
    weight_decay: float = 0.5
    clamp: float = 4.0
    stop_prob: float = 0.9
    essence: str = "{subject} is a"
    edit_batch: int = 16  # edits optimised together


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (δ [n, d_model], final target probability [n]) for ``edits``.

    The model is not modified (δ enters through a temporary forward hook).
    ``compact=False`` keeps finished edits' rows in every forward pass (the
    same result, slower; the baseline of ``benchmarks/bench_values.py``).
    """
    deltas, probs = [], []
    for start in range(0, len(edits), params.edit_batch):
        chunk = edits[start: start + params.edit_batch]
        d, p = _optimise_chunk(model, tok, adapter, layer, chunk, prefixes, params, seed + start,
                               compact)
        deltas.append(d)
        probs.append(p)
        if progress:
            progress(len(chunk))
    return torch.cat(deltas), torch.cat(probs)


def _optimise_chunk(model, tok, adapter, layer, edits, prefixes, params, seed, compact):
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    rw = build_batch(tok, edits, prefixes, with_targets=True, device=device)
    ess = build_batch(tok, _essence_edits(edits, params.essence), [""], with_targets=False,
                      device=device)
    n = len(edits)
    path = adapter.site("mlp_out", layer)
    head = model.get_output_embeddings()
    body = model.base_model

    # v₀: the MLP output at the lookup position of the bare prompt (first prefix is "").
    first_rows = torch.tensor([i * len(prefixes) for i in range(n)], device=device)
    with torch.no_grad(), Trace(model, path, retain_output=True) as tr:
        body(input_ids=rw.input_ids[first_rows], attention_mask=rw.attention_mask[first_rows])
    v0 = tr.output[torch.arange(n, device=device), rw.lookup[first_rows]].float()
    v0_norm = v0.norm(dim=-1).clamp_min(1e-6)

    d_model = v0.shape[-1]
    delta = torch.zeros(n, d_model, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=params.lr)

    rows_all = torch.cat([rw.edit_index, ess.edit_index])
    look_all = torch.cat([rw.lookup, ess.lookup])
    width = max(rw.input_ids.shape[1], ess.input_ids.shape[1])
    ids = torch.cat([_pad(rw.input_ids, width, tok.pad_token_id or 0), _pad(ess.input_ids, width, tok.pad_token_id or 0)])
    mask = torch.cat([_pad(rw.attention_mask, width, 0), _pad(ess.attention_mask, width, 0)])
    n_rw = rw.input_ids.shape[0]
    ess_rows = n_rw + torch.arange(n, device=device)
    ess_last = ess.attention_mask.sum(1) - 1
    t_rows = torch.tensor([r for r, _, _ in rw.target_pos], device=device)
    t_pos = torch.tensor([p for _, p, _ in rw.target_pos], device=device)
    t_tok = torch.tensor([t for _, _, t in rw.target_pos], device=device)
    t_edit = rw.edit_index[t_rows]
    tokens_per_edit = torch.zeros(n, device=device).index_add_(0, t_edit, torch.ones_like(t_edit, dtype=torch.float))

    # Finished edits leave the batch: their δ is frozen and their rows cannot
    # affect other edits' rows, so only the unfinished edits' rows are run
    # (trimmed to their longest row), which makes later steps cheaper.
    cur: dict[str, torch.Tensor] = {}

    def select(active: torch.Tensor) -> None:
        keep = active[rows_all].nonzero()[:, 0]
        new_row = torch.full((ids.shape[0],), -1, dtype=torch.long, device=device)
        new_row[keep] = torch.arange(keep.numel(), device=device)
        t_keep = active[t_edit]
        w = int(mask[keep].sum(1).max())
        cur.update(ids=ids[keep, :w], mask=mask[keep, :w], rows=torch.arange(keep.numel(), device=device),
                   look=look_all[keep], edit_of_row=rows_all[keep], t_rows=new_row[t_rows[t_keep]],
                   t_pos=t_pos[t_keep], t_tok=t_tok[t_keep], t_edit=t_edit[t_keep],
                   ess_rows=new_row[ess_rows[active]], ess_last=ess_last[active],
                   edits=active.nonzero()[:, 0])

    def add_delta(output, _path):
        out = output[0] if isinstance(output, tuple) else output
        add = torch.zeros_like(out)
        add[cur["rows"], cur["look"]] = delta[cur["edit_of_row"]].to(out.dtype)
        out = out + add
        return (out, *output[1:]) if isinstance(output, tuple) else out

    kl_base = torch.zeros(n, 0, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    final_p = torch.zeros(n, device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    select(active)
    for step in range(params.steps):
        opt.zero_grad()
        with Trace(model, path, edit_output=add_delta):
            h = body(input_ids=cur["ids"], attention_mask=cur["mask"]).last_hidden_state
        edits_now = cur["edits"]
        logits_t = head(h[cur["t_rows"], cur["t_pos"]]).float().log_softmax(-1)
        logp = logits_t.gather(1, cur["t_tok"][:, None])[:, 0]
        # mean over the edit's target tokens under every prefix
        nll = torch.zeros(n, device=device).index_add_(0, cur["t_edit"], -logp)[edits_now] \
            / tokens_per_edit[edits_now]
        ess_logp = head(h[cur["ess_rows"], cur["ess_last"]]).float().log_softmax(-1)
        if step == 0:
            kl_base = ess_logp.detach()
        kl = torch.nn.functional.kl_div(ess_logp, kl_base[edits_now], log_target=True,
                                        reduction="none").sum(-1)
        decay = params.weight_decay * (delta[edits_now].norm(dim=-1) ** 2) / (v0_norm[edits_now] ** 2)
        per_edit = nll + params.kl_weight * kl + decay
        final_p[edits_now] = torch.exp(-nll.detach())
        done = done | (final_p >= params.stop_prob)
        if bool(done.all()) or step == params.steps - 1:
            break
        loss = (per_edit * (~done[edits_now]).float()).sum()
        loss.backward()
        frozen = delta.detach().clone()
        opt.step()
        with torch.no_grad():
            delta[done] = frozen[done]  # Adam's momentum must not move finished edits
            max_norm = params.clamp * v0_norm
            norms = delta.norm(dim=-1)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
            delta.mul_(scale[:, None])
        if compact and bool((active & done).any()):
            active = ~done
            select(active)
    d = delta.detach()
    if not torch.isfinite(d).all():
        raise FloatingPointError("the value optimisation produced NaN/inf")
    return d, final_p


def _pad(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], 1)


def mean_token_prob(nll: float) -> float:
    """exp(−mean NLL): the geometric-mean probability of the target tokens."""
    return math.exp(-nll)
