"""The codebook's keys and values: model states at given tokens, and value training.

Contents:
    states_at()      MLP input (key) and output at each occurrence's key token
    all_states()     MLP inputs at every token of some prompts (preserve negatives)
    train_values()   one value per codebook entry (see :mod:`kmec.backends.memory`)

Split from :mod:`kmec.backends.memory` (GRACE's rules and the backend) to keep
each file to one concept; the objective is stated there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from kmec.backends.base import ExecContext
from kmec.backends.keys import build_batch, context_prefixes
from kmec.models.hooks import Trace, device_of, hidden_of, with_hidden
from kmec.planner.model import EditRequest

if TYPE_CHECKING:
    from kmec.backends.memory import Codebook, MemoryParams, Occurrence


def _requests(occ: Sequence[Occurrence]) -> list[EditRequest]:
    return [EditRequest(name=f"o{i}", prompt=o.prompt, subject=o.subject, target_new=o.target)
            for i, o in enumerate(occ)]


@torch.no_grad()
def states_at(ctx: ExecContext, site: str, occ: Sequence[Occurrence]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """MLP input (key) and output at each occurrence's key position (bare prompt)."""
    device = device_of(ctx.model)
    batch = build_batch(ctx.tok, _requests(occ), [""], with_targets=False, device=device)
    keys, outs = [], []
    for start in range(0, batch.input_ids.shape[0], 64):
        sl = slice(start, start + 64)
        with Trace(ctx.model, site, retain_input=True, retain_output=True, stop=True) as tr:
            ctx.model(input_ids=batch.input_ids[sl], attention_mask=batch.attention_mask[sl])
        rows = torch.arange(tr.input.shape[0], device=device)
        keys.append(tr.input[rows, batch.lookup[sl]].float())
        outs.append(tr.output[rows, batch.lookup[sl]].float())
    return torch.cat(keys), torch.cat(outs)


@torch.no_grad()
def all_states(ctx: ExecContext, site: str, prompts: Sequence[str]) -> torch.Tensor:
    """MLP inputs at every token of ``prompts``: ``[tokens, d]`` (right-padded batches)."""
    device = device_of(ctx.model)
    rows = [r for r in (ctx.tok.encode(p, add_special_tokens=False) for p in prompts) if r]
    out = []
    for start in range(0, len(rows), 64):
        chunk = rows[start:start + 64]
        width = max(map(len, chunk))
        ids = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(chunk):
            ids[i, :len(r)] = torch.tensor(r, device=device)
            mask[i, :len(r)] = 1
        with Trace(ctx.model, site, retain_input=True, stop=True) as tr:
            ctx.model(input_ids=ids, attention_mask=mask)
        out.append(tr.input[mask.bool()].float())
    return torch.cat(out) if out else torch.zeros(0, 1, device=device)


def train_values(ctx: ExecContext, site: str, occ: Sequence[Occurrence], book: Codebook,
                  outs: torch.Tensor, p: MemoryParams, step_id: str) -> torch.Tensor:
    """One value per entry (see the module docstring), trained in chunks of entries."""
    prefixes = context_prefixes(ctx.model, ctx.tok, n=p.n_prefixes, length=p.prefix_len,
                                seed=ctx.seed, cache_dir=ctx.cache_dir,
                                fingerprint=ctx.facts.fingerprint)
    n = len(book.keys)
    values = []
    for entries in chunk_entries(ctx.tok, occ, book, prefixes, p.edit_batch, p.max_tokens):
        torch.manual_seed(ctx.seed + entries[0])
        v, prob = _train_chunk(ctx, site, occ, book, entries, outs, prefixes, p)
        low = [book.labels[e] for e, q in zip(entries, prob.tolist()) if q < 0.5]
        if low:
            ctx.log.warning("memory %s: target probability stays below 0.5 for %s",
                            step_id, ", ".join(low))
        values.append(v)
        if ctx.progress:
            ctx.progress(f"memory values {step_id}", entries[-1] + 1, n)
    out = torch.cat(values)
    if not torch.isfinite(out).all():
        raise FloatingPointError("the codebook's value training produced NaN/inf")
    return out


def chunk_entries(tok: Any, occ: Sequence[Occurrence], book: Codebook, prefixes: Sequence[str],
                  max_entries: int, max_tokens: int) -> list[list[int]]:
    """Consecutive entries in chunks of at most ``max_entries`` entries and about
    ``max_tokens`` padded tokens (rows × widest row; at least one entry each),
    which bounds the activations kept for the backward pass.

    >>> from kmec.backends.memory import Codebook, Occurrence
    >>> class T:
    ...     def encode(self, s, add_special_tokens=False): return list(s.encode())
    >>> occ = [Occurrence(i, "x" * 10, None, "y", "l") for i in range(4)]
    >>> book = Codebook(); _ = [book.add(torch.ones(2) * i, 1.0, "l", i) for i in range(4)]
    >>> chunk_entries(T(), occ, book, [""], 16, 30), chunk_entries(T(), occ, book, [""], 3, 999)
    ([[0, 1], [2, 3]], [[0, 1, 2], [3]])
    """
    extra = max((len(tok.encode(x, add_special_tokens=False)) for x in prefixes), default=0)
    chunks: list[list[int]] = [[]]
    rows = width = 0
    for e in range(len(book.keys)):
        lengths = [len(tok.encode(occ[m].prompt + " " + occ[m].target, add_special_tokens=False))
                   + extra for m in book.members[e]]
        e_rows, e_width = len(lengths) * len(prefixes), max(lengths)
        full = len(chunks[-1]) >= max_entries or \
            (rows + e_rows) * max(width, e_width) > max_tokens
        if chunks[-1] and full:
            chunks.append([])
            rows = width = 0
        chunks[-1].append(e)
        rows, width = rows + e_rows, max(width, e_width)
    return [c for c in chunks if c]


def _train_chunk(ctx: ExecContext, site: str, occ: Sequence[Occurrence], book: Codebook,
                 entries: list[int], outs: torch.Tensor, prefixes: Sequence[str],
                 p: MemoryParams) -> tuple[torch.Tensor, torch.Tensor]:
    model, tok = ctx.model, ctx.tok
    device = device_of(model)
    members = [(e_local, m) for e_local, e in enumerate(entries) for m in book.members[e]]
    rw = build_batch(tok, _requests([occ[m] for _, m in members]), prefixes, with_targets=True,
                     device=device)
    row_entry = torch.tensor([members[i][0] for i in rw.edit_index.tolist()], device=device)
    subjects = [(e_local, occ[book.members[e][0]].subject)
                for e_local, e in enumerate(entries) if occ[book.members[e][0]].subject]
    ess = build_batch(tok, [EditRequest(name=f"s{i}", prompt=f"{s} is a", subject=s,
                                        target_new="x") for i, (_, s) in enumerate(subjects)],
                      [""], with_targets=False, device=device) if subjects else None
    ess_entry = torch.tensor([e for e, _ in subjects], device=device, dtype=torch.long)

    init = torch.stack([outs[book.members[e]].mean(0) for e in entries]).to(device)
    v = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=p.lr)
    ids, mask, look, rows_entry, n_rw = _joint(rw, ess, row_entry, ess_entry, tok)
    t_rows = torch.tensor([r for r, _, _ in rw.target_pos], device=device)
    t_pos = torch.tensor([q for _, q, _ in rw.target_pos], device=device)
    t_tok = torch.tensor([t for _, _, t in rw.target_pos], device=device)
    t_entry = row_entry[t_rows]
    n = len(entries)
    per_entry = torch.zeros(n, device=device).index_add_(0, t_entry, torch.ones_like(t_pos,
                                                                                     dtype=torch.float))
    idx = torch.arange(ids.shape[0], device=device)
    head, body = model.get_output_embeddings(), model.base_model

    def replace(output: Any, _path: str) -> Any:
        out = hidden_of(output).clone()
        out[idx, look] = v[rows_entry].to(out.dtype)
        return with_hidden(output, out)

    kl_base, done = None, torch.zeros(n, dtype=torch.bool, device=device)
    prob = torch.zeros(n, device=device)
    for it in range(p.steps + 1):
        opt.zero_grad()
        with Trace(model, site, edit_output=replace):
            h = body(input_ids=ids, attention_mask=mask).last_hidden_state
        logp = head(h[t_rows, t_pos]).float().log_softmax(-1).gather(1, t_tok[:, None])[:, 0]
        nll = torch.zeros(n, device=device).index_add_(0, t_entry, -logp) / per_entry
        loss_e = nll
        if ess is not None:
            last = ess.attention_mask.sum(1) - 1
            ess_lp = head(h[n_rw + torch.arange(len(subjects), device=device), last]
                          ).float().log_softmax(-1)
            kl_base = ess_lp.detach() if kl_base is None else kl_base
            kl = torch.nn.functional.kl_div(ess_lp, kl_base, log_target=True,
                                            reduction="none").sum(-1)
            loss_e = loss_e + p.kl_weight * torch.zeros(n, device=device).index_add(0, ess_entry, kl)
        prob = torch.exp(-nll.detach())
        done = done | (prob >= p.stop_prob)
        if bool(done.all()) or it == p.steps:
            break
        (loss_e * (~done).float()).sum().backward()
        frozen = v.detach().clone()
        opt.step()
        with torch.no_grad():
            v[done] = frozen[done]
    ctx.log.debug("memory: %d Adam steps, target probabilities %s", it,
                  [round(float(x), 3) for x in prob])
    return v.detach(), prob


def _joint(rw: Any, ess: Any, row_entry: torch.Tensor, ess_entry: torch.Tensor, tok: Any
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Rewrite rows and essence rows in one right-padded batch."""
    n_rw = rw.input_ids.shape[0]
    if ess is None:
        return rw.input_ids, rw.attention_mask, rw.lookup, row_entry, n_rw
    width = max(rw.input_ids.shape[1], ess.input_ids.shape[1])
    pad = tok.pad_token_id or 0

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        extra = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
        return torch.cat([t, extra], 1)

    ids = torch.cat([widen(rw.input_ids, pad), widen(ess.input_ids, pad)])
    mask = torch.cat([widen(rw.attention_mask, 0), widen(ess.attention_mask, 0)])
    return (ids, mask, torch.cat([rw.lookup, ess.lookup]), torch.cat([row_entry, ess_entry]),
            n_rw)
