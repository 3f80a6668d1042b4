"""Shared MEND mechanics: token rows, gradient factors, edits as low-rank hooks, losses.

Contents:
    Rows            tokenised ``prompt + target`` rows with labels and the active mask
    tokenize()      build Rows (targets scored with the leading space, as verify does)
    base_pass()     one forward/backward of the unedited model: (u, δ) of every
                    edited layer for the chosen rows, and the base log-probabilities
    editor_factors()  (u, δ) -> the edit's factors (ũ, −α δ̃) through the editor
    group_factors()   several edits summed into one (edits applied together)
    edited()        context manager: each row runs with its own edit ΔW added
    scored_logp()   log-probabilities at the scored positions only
    row_nll(), token_accuracy(), row_kl(), same_argmax()   per-row losses and metrics

Gradient factors. For an edited linear layer ``y_t = W u_t``, the gradient of
``L = Σ_rows mean_targets −log P(target)`` is ``Σ_t δ_t u_tᵀ`` with ``δ_t =
∂L/∂y_t``: ``u_t`` is the layer's input and ``δ_t`` the gradient at its output,
obtained in one backward pass by adding a zero tensor that requires grad to the
output (the model's own parameters need no gradient, so autograd only walks
back from the loss to the first edited layer). Each row's loss depends only on
its own tokens, so the factors of one row are those of its edit alone.

Edits as hooks. ``ΔW x = (D^T U) x = Dᵀ (U x)`` for factors ``U`` [tokens, d_in]
and ``D`` [tokens, d_out], so a row's edited output is ``y + (x Uᵀ) D``: the
training loop runs a different edit per row in one batched pass without ever
forming ΔW or touching the weights, and :mod:`kmec.artifacts` later adds the
same ``Dᵀ U`` as a ``LowRank`` payload.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kmec.backends.mend.model import EditorNet
from kmec.models.adapters import ArchAdapter
from kmec.models.hooks import TraceDict, hidden_of, with_hidden
from kmec.models.tokens import target_text

IGNORE = -100
Factors = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (U [E, T, d_in], D [E, T, d_out])


@dataclass
class Rows:
    """Tokenised rows ``prompt + target[:-1]`` (right-padded).

    Attributes:
        input_ids, attention_mask: [R, T].
        labels: [R, T] the target token predicted from each position, IGNORE elsewhere.
        active: [R, T] positions whose outputs reach the row's loss (up to its
            last labelled position); only these carry gradient factors.
        scored: [R, T] positions whose next-token distribution is scored: the
            labelled ones, or the last position of an unlabelled row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    active: torch.Tensor
    scored: torch.Tensor

    def select(self, rows: Any) -> Rows:
        """The rows at ``rows`` (an index tensor or slice)."""
        return Rows(self.input_ids[rows], self.attention_mask[rows], self.labels[rows],
                    self.active[rows], self.scored[rows])

    @property
    def row_of(self) -> torch.Tensor:
        """The row of each scored position (in ``scored``'s row-major order)."""
        return self.scored.nonzero()[:, 0]

    def in_rows(self, start: int, stop: int) -> torch.Tensor:
        """Mask over the scored positions that belong to rows ``start..stop-1``."""
        row_of = self.row_of
        return (row_of >= start) & (row_of < stop)

    @property
    def targets(self) -> torch.Tensor:
        """The label of each scored position (IGNORE for an unlabelled row's last one)."""
        return self.labels[self.scored]


TEXT = object()  # a row's "target" that makes it a text row: its own next tokens are scored
TEXT_STRIDE = 3  # a text row is scored at every third position (the unembedding is costly)


def tokenize(tok: Any, rows: Sequence[tuple[str, Any]], *, max_len: int = 96,
             device: Any = "cpu") -> Rows:
    """Tokenise ``(prompt, target)`` pairs.

    A None target gives an unlabelled row (only its last position is scored);
    the target :data:`TEXT` makes a text row, scored at every
    :data:`TEXT_STRIDE`-th position with its own next tokens as labels. Long
    prompts keep their last tokens, so a row never exceeds ``max_len``.
    """
    seqs, labels = [], []
    for prompt, target in rows:
        ctx = list(tok.encode(prompt, add_special_tokens=False)) or [tok.eos_token_id or 0]
        if target is TEXT:
            ctx = ctx[:max_len]
            seqs.append(ctx)
            labels.append([t if p % TEXT_STRIDE == TEXT_STRIDE - 1 else IGNORE
                           for p, t in enumerate(ctx[1:])] + [IGNORE])
            continue
        tgt = list(tok.encode(target_text(prompt, target), add_special_tokens=False)) if target else []
        tgt = tgt[: max_len // 2]
        ctx = ctx[-(max_len - max(len(tgt) - 1, 0)):]
        seqs.append(ctx + tgt[:-1])
        labels.append([IGNORE] * (len(ctx) - 1) + tgt + [IGNORE] * (1 if not tgt else 0))
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    active = torch.zeros((len(seqs), width), dtype=torch.bool)
    scored = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, y) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        lab[i, : len(y)] = torch.tensor(y)
        labelled = [p for p, t in enumerate(y) if t != IGNORE] or [len(s) - 1]
        active[i, : labelled[-1] + 1] = True
        scored[i, labelled] = True
    return Rows(ids.to(device), mask.to(device), lab.to(device), active.to(device),
                scored.to(device))


def scored_logp(model: Any, rows: Rows) -> torch.Tensor:
    """Log-probabilities at the scored positions only: [positions, vocab] float32.

    The unembedding (a 49k × 576 matrix for SmolLM2) runs on these few
    positions instead of every token of every row.
    """
    hidden = model.base_model(input_ids=rows.input_ids,
                              attention_mask=rows.attention_mask).last_hidden_state
    return model.get_output_embeddings()(hidden[rows.scored]).float().log_softmax(-1)


def _per_row(values: torch.Tensor, rows: Rows) -> torch.Tensor:
    n = rows.input_ids.shape[0]
    row_of = rows.row_of
    total = values.new_zeros(n).index_add(0, row_of, values)
    count = values.new_zeros(n).index_add(0, row_of, torch.ones_like(values))
    return total / count.clamp_min(1)


def row_nll(logp: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Mean −log P of each row's labelled tokens: [R] (0 for unlabelled rows)."""
    y = rows.targets
    picked = logp.gather(-1, y.clamp_min(0)[:, None])[:, 0] * (y != IGNORE)
    return _per_row(-picked, rows) * (rows.labels != IGNORE).any(-1)


def token_accuracy(logp: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Fraction of each row's labelled tokens that are the argmax: [R]."""
    return _per_row((logp.argmax(-1) == rows.targets).to(logp.dtype), rows)


def row_kl(base_logp: torch.Tensor, logp: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Mean over each row's scored positions of KL(base ‖ edited): [R]."""
    return _per_row((base_logp.exp() * (base_logp - logp)).sum(-1), rows)


def same_argmax(base_logp: torch.Tensor, logp: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Share of each row's scored positions whose argmax did not change: [R]."""
    return _per_row((base_logp.argmax(-1) == logp.argmax(-1)).to(logp.dtype), rows)


@dataclass
class BasePass:
    """What one pass of the unedited model gives: factors per layer and log-probs."""

    u: dict[int, torch.Tensor]      # layer -> [E, T, d_in]
    delta: dict[int, torch.Tensor]  # layer -> [E, T, d_out]
    logp: torch.Tensor              # [scored positions, vocab] (detached, float32)
    nll: torch.Tensor               # [R]


def base_pass(model: Any, adapter: ArchAdapter, layers: Sequence[int], rows: Rows,
              grad_rows: torch.Tensor) -> BasePass:
    """Forward all ``rows``; backward the NLL of ``grad_rows`` to the edited layers' outputs.

    The model is not changed (the zero tensors live only inside the hooks).
    """
    paths = {adapter.site("mlp_out", layer): layer for layer in layers}
    leaves: dict[str, torch.Tensor] = {}

    def add_leaf(output: Any, path: str) -> Any:
        out = hidden_of(output)
        leaves[path] = torch.zeros_like(out, requires_grad=True)
        return with_hidden(output, out + leaves[path])

    with torch.enable_grad(), TraceDict(model, paths, retain_input=True,
                                        edit_output=add_leaf) as td:
        logp = scored_logp(model, rows)
        nll = row_nll(logp, rows)
        grads = torch.autograd.grad(nll[grad_rows].sum(), [leaves[p] for p in paths])
    u = {layer: td[p].input[grad_rows].float() for p, layer in paths.items()}
    delta = {layer: g[grad_rows].float() for g, layer in zip(grads, paths.values())}
    return BasePass(u=u, delta=delta, logp=logp.detach(), nll=nll.detach())


def editor_factors(net: EditorNet, layers: Sequence[int], base: BasePass, active: torch.Tensor,
                   *, observe: bool = False) -> Factors:
    """Map each layer's active (u, δ) rows through the editor: factors (U = ũ, D = −α δ̃).

    Inactive positions (padding, tokens after the last target) get zero factors.
    With ``observe`` the running statistics first take in this batch (training).
    """
    out: Factors = {}
    for i, layer in enumerate(layers):
        u, d = base.u[layer][active], base.delta[layer][active]
        if observe:
            net.observe(i, u, d)
        u_t, d_t = net(i, u, d)
        U = u_t.new_zeros(*active.shape, u_t.shape[-1])
        D = d_t.new_zeros(*active.shape, d_t.shape[-1])
        U = U.masked_scatter(active[..., None], u_t)
        D = D.masked_scatter(active[..., None], -net.alpha(i) * d_t)
        out[layer] = (U, D)
    return out


def group_factors(factors: Factors, size: int) -> Factors:
    """Sum the edits of each run of ``size`` consecutive edits into one edit.

    Edit ``i`` becomes part of edit ``i // size``: its token rows are
    concatenated, so the grouped ΔW is the sum of the members' ΔW (as when
    several edits are applied together). A short last group is zero-padded.
    """
    out: Factors = {}
    for layer, (U, D) in factors.items():
        pad = (-U.shape[0]) % size
        if pad:
            U = torch.cat([U, U.new_zeros(pad, *U.shape[1:])])
            D = torch.cat([D, D.new_zeros(pad, *D.shape[1:])])
        out[layer] = (U.reshape(-1, size * U.shape[1], U.shape[2]),
                      D.reshape(-1, size * D.shape[1], D.shape[2]))
    return out


@contextlib.contextmanager
def edited(model: Any, adapter: ArchAdapter, factors: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
           row_edit: torch.Tensor) -> Iterator[None]:
    """Run the model with row r edited by edit ``row_edit[r]`` (−1: unedited).

    Adds ``(x Uᵀ) D`` of that edit to the output of every edited layer.
    """
    paths = {adapter.site("mlp_out", layer): layer for layer in factors}
    keep = (row_edit >= 0)[:, None, None]
    pick = row_edit.clamp_min(0)
    traces: list[TraceDict] = []  # filled once the hooks exist; read when the model runs

    def add_edit(output: Any, path: str) -> Any:
        out = hidden_of(output)
        U, D = factors[paths[path]]
        x = traces[0][path].input.float()
        corr = torch.bmm(torch.bmm(x, U[pick].transpose(1, 2)), D[pick]) * keep
        return with_hidden(output, out + corr.to(out.dtype))

    with TraceDict(model, paths, retain_input=True, detach=False, edit_output=add_edit) as td:
        traces.append(td)
        yield
