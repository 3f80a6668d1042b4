"""Installing external memories on a model: the runtime half of ``memory`` and ``retrieval``.

Contents:
    install_memory()   MemoryTable -> an :class:`Installed` handle (``close()`` removes it)
    Installed          what :func:`kmec.artifacts.apply` keeps in ``Applied.hooks``
    codebook_lookup()  which positions a codebook fires at, and with which entry (pure)
    CodebookSite       one hook on an MLP serving every codebook table installed there
    RetrievalSite      one hook on the model body serving every retrieval table installed there

Weights are never touched: a memory is a forward hook (:class:`kmec.models.hooks.Trace`),
so removing it gives back the base model's outputs bit for bit.

**Codebook** (``meta["kind"] == "codebook"``, GRACE-style, see :mod:`kmec.backends.memory`).
The hook sits on the MLP of one block. At every position of every sequence, the
MLP's input ``h`` is compared with the keys; with ``j = argmin_i ‖h − k_i‖``
the position *fires* when ``‖h − k_j‖ ≤ r_j``, and then the MLP's output there is
replaced by ``v_j``. Positions that do not fire keep the MLP's own output (the
same tensor, untouched). Whether a position fires never depends on what else
is in the batch: squared distances from one GEMM (fast, but its rounding
depends on the batch) only pick the rows that *might* fire, with a slack of
``4 · d · eps · (‖h‖² + ‖k‖²)`` above the GEMM's worst-case rounding error,
and those rows are decided on exact pairwise distances. Tables installed at the same MLP are
searched together: the nearest key over all of them decides.

**Retrieval** (``meta["kind"] == "retrieval"``, SERAC/IKE-style, see
:mod:`kmec.backends.retrieval`). The hook sits on the model body (the module
``model.base_model``). Routing is causal, position by position: the text of
each sequence up to and including a token (real tokens, ``attention_mask ==
1``) goes to the scope classifier, and the position is answered as the base
model answers that text with the chosen edit's demonstration in front of it
(the row is run again once per edit it was routed to, ``demonstration +
row``, and the hidden states of those positions replace the base pass's).
Positions out of scope keep the base pass's hidden states, so a prompt in
scope of nothing gives exactly the base model's logits, and a target scored
teacher-forced sees the same decision as when it is generated (the position
that predicts it reads only the prompt). Because a decision reads the whole
text before the position, every call must carry the whole text: installing a
retrieval memory sets ``generation_config.use_cache`` to False (restored on
close), and a call that continues a KV cache raises a
:class:`~kmec.errors.ModelError`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kmec.artifacts.payloads import MemoryTable
from kmec.errors import ArtifactError, ModelError
from kmec.models.hooks import Trace, device_of, get_module, hidden_of, with_hidden

LOOKUP_ROWS = 4096  # positions compared with the keys at once (bounds the distance matrix)


@dataclass
class Installed:
    """A memory table installed at a site; ``close()`` removes it (idempotent)."""

    site: Any
    table: MemoryTable
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.site.remove(self.table)
            self.closed = True


# One site object per hooked module, so tables installed at the same module
# share one hook (weak: a model that is garbage-collected takes its sites along).
_SITES: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()


def install_memory(model: Any, table: MemoryTable, *, tok: Any = None) -> Installed:
    """Install ``table`` on ``model`` (in place, weights untouched).

    Args:
        model: a causal LM.
        table: a codebook or retrieval table (``table.meta["kind"]``).
        tok: the model's tokenizer; required for a retrieval table (it reads
            the text of each sequence and tokenises the demonstrations).

    Returns:
        The handle; ``close()`` removes the table again.

    Raises:
        ArtifactError: an unknown memory kind, malformed tensors, or a site the
            model does not have.
        ModelError: a retrieval table without a tokenizer, or an embedding
            model that is not the one the table was compiled with.
    """
    kind = table.meta.get("kind")
    if kind not in ("codebook", "retrieval"):
        raise ArtifactError(f"memory table at {table.site!r} has unknown kind {kind!r}",
                            hint="it was written by another kmec version; recompile the spec")
    _check_shapes(table)
    try:
        module = get_module(model, table.site)
    except ModelError as e:
        raise ArtifactError(f"the model has no module {table.site!r} for the memory table",
                            hint=e.hint) from None
    site = _SITES.get(module)
    if site is None:
        site = (CodebookSite(model, table.site) if kind == "codebook"
                else RetrievalSite(model, table.site, tok))
        _SITES[module] = site
    elif site.kind != kind:
        raise ArtifactError(f"a {site.kind} memory is already installed at {table.site!r}; "
                            f"a {kind} memory cannot share it")
    try:
        if kind == "retrieval":
            site.check_tok(tok)
        site.add(table)
    except BaseException:
        site.close_if_empty()
        raise
    return Installed(site, table)


def _check_shapes(t: MemoryTable) -> None:
    n = t.keys.shape[0] if t.keys.ndim == 2 else -1
    if n < 0 or t.values.shape[:1] != (n,) or t.radius.shape != (n,):
        raise ArtifactError(
            f"memory table at {t.site!r} has keys {tuple(t.keys.shape)}, values "
            f"{tuple(t.values.shape)} and radius {tuple(t.radius.shape)}; expected [n, d], "
            "[n, ...] and [n]", hint="the artifact is corrupt; recompile it")


# ---------------------------------------------------------------- codebook


def codebook_lookup(x: torch.Tensor, keys: torch.Tensor,
                    radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows of ``x`` fall within the radius of their nearest key.

    Args:
        x: ``[N, d]`` states.
        keys: ``[n, d]``; radius: ``[n]``.

    Returns:
        ``(fire [N] bool, nearest [N] long)``: ``fire[i]`` is
        ``min_j ‖x_i − k_j‖ ≤ r_{nearest[i]}``, decided on exact pairwise
        distances; ``nearest`` is exact where a row might fire (elsewhere it
        comes from the GEMM and may differ on near-ties; it is not used there).

    >>> keys = torch.tensor([[0.0, 0.0], [4.0, 0.0]]); r = torch.tensor([1.0, 0.5])
    >>> fire, idx = codebook_lookup(torch.tensor([[0.5, 0.0], [3.0, 0.0], [4.2, 0.0]]), keys, r)
    >>> fire.tolist(), idx.tolist()
    ([True, False, True], [0, 1, 1])
    """
    k, r = keys.float(), radius.float().to(keys.device)
    k2 = k.square().sum(1)
    fire = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    nearest = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    slack_rel = 4 * k.shape[1] * torch.finfo(torch.float32).eps
    for start in range(0, x.shape[0], LOOKUP_ROWS):
        xs = x[start:start + LOOKUP_ROWS].float()
        x2 = xs.square().sum(1, keepdim=True)
        # fast: squared distances by one GEMM, and a slack above its worst-case rounding
        d2 = x2 + k2 - 2 * xs @ k.T
        maybe = (d2 <= r.square() + slack_rel * (x2 + k2)).any(dim=1).nonzero().flatten()
        if maybe.numel() == 0:
            nearest[start:start + xs.shape[0]] = d2.argmin(dim=1)
            continue
        # exact, pair by pair, for the rows that might fire
        d = torch.cdist(xs[maybe], k, compute_mode="donot_use_mm_for_euclid_dist")
        dmin, idx = d.min(dim=1)
        nearest[start:start + xs.shape[0]] = d2.argmin(dim=1)
        nearest[start + maybe] = idx
        fire[start + maybe] = dmin <= r[idx]
    return fire, nearest


class CodebookSite:
    """The hook on one MLP and the codebook tables installed there."""

    kind = "codebook"

    def __init__(self, model: Any, path: str) -> None:
        self.path = path
        self.tables: list[MemoryTable] = []
        self.device = device_of(model)
        self.keys = self.values = self.radius = None
        self.trace = Trace(model, path, retain_input=True, edit_output=self._edit)

    def add(self, table: MemoryTable) -> None:
        if self.tables and table.keys.shape[1:] != self.tables[0].keys.shape[1:]:
            raise ArtifactError(f"codebook at {self.path} has keys of width {table.keys.shape[1]}, "
                                f"the installed one {self.tables[0].keys.shape[1]}")
        self.tables.append(table)
        self._stack()

    def remove(self, table: MemoryTable) -> None:
        self.tables = [t for t in self.tables if t is not table]
        if self.tables:
            self._stack()
        else:
            self.close_if_empty()

    def close_if_empty(self) -> None:
        if not self.tables:
            self.trace.close()
            _forget(self)

    def _stack(self) -> None:
        self.keys = torch.cat([t.keys for t in self.tables]).to(self.device, torch.float32)
        self.values = torch.cat([t.values for t in self.tables]).to(self.device, torch.float32)
        self.radius = torch.cat([t.radius for t in self.tables]).to(self.device, torch.float32)

    def _edit(self, output: Any, _path: str) -> Any:
        x = self.trace.input
        out = hidden_of(output)
        if x is None or x.shape[:-1] != out.shape[:-1]:
            return output
        fire, idx = codebook_lookup(x.reshape(-1, x.shape[-1]), self.keys, self.radius)
        if not bool(fire.any()):
            return output
        flat = out.reshape(-1, out.shape[-1]).clone()
        flat[fire] = self.values[idx[fire]].to(flat.dtype)
        new = flat.view(out.shape)
        return with_hidden(output, new)


def _forget(site: Any) -> None:
    for module, s in list(_SITES.items()):
        if s is site:
            del _SITES[module]


# ---------------------------------------------------------------- retrieval


class RetrievalSite:
    """The hook on the model body and the retrieval tables installed there."""

    kind = "retrieval"

    def __init__(self, model: Any, path: str, tok: Any) -> None:
        from kmec.artifacts.scope import ScopeClassifier

        self.model, self.path, self.tok = model, path, tok
        self.tables: list[MemoryTable] = []
        self.classifier: ScopeClassifier | None = None
        self.busy = False
        self.limit = _max_positions(model.config)
        gen = getattr(model, "generation_config", None)
        self.saved_use_cache = getattr(gen, "use_cache", None) if gen is not None else None
        if gen is not None:
            gen.use_cache = False
        self.trace = Trace(model, path, edit_call=self._edit)

    def check_tok(self, tok: Any) -> None:
        if tok is None and self.tok is None:
            raise ModelError("a retrieval memory needs the model's tokenizer to read each input",
                             hint="pass tok= to kmec.apply / install_memory")
        self.tok = self.tok or tok

    def add(self, table: MemoryTable) -> None:
        from kmec.artifacts.scope import ScopeClassifier

        self.classifier = ScopeClassifier.from_tables([*self.tables, table], self.tok)
        self.tables.append(table)

    def remove(self, table: MemoryTable) -> None:
        from kmec.artifacts.scope import ScopeClassifier

        self.tables = [t for t in self.tables if t is not table]
        if self.tables:
            self.classifier = ScopeClassifier.from_tables(self.tables, self.tok)
        else:
            self.classifier = None
            self.close_if_empty()

    def close_if_empty(self) -> None:
        if self.tables:
            return
        self.trace.close()
        gen = getattr(self.model, "generation_config", None)
        if gen is not None and self.saved_use_cache is not None:
            gen.use_cache = self.saved_use_cache
        _forget(self)

    def _edit(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if self.busy or self.classifier is None:
            return output
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ModelError("the retrieval memory reads the input text, but this call passed "
                             "inputs_embeds instead of input_ids",
                             hint="call the model with input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        if seen > ids.shape[1]:
            raise ModelError(
                "the retrieval memory reads all the text before each position, but this call "
                "continues a KV cache (only the new tokens are passed)",
                hint="generate with use_cache=False (kmec sets generation_config.use_cache=False "
                "when it installs the memory), or pass the full text on every call")
        mask = kwargs.get("attention_mask")
        if mask is None or mask.ndim != 2:
            mask = torch.ones_like(ids)
        rows = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
        routes = self.classifier.route(rows)
        runs = sorted({(b, o) for b, r in enumerate(routes) for o in r if o is not None})
        if not runs:
            return output
        return self._rerun(output, ids, mask, rows, routes, runs)

    def _rerun(self, output: Any, ids: torch.Tensor, mask: torch.Tensor,
               rows: Sequence[list[int]], routes: Sequence[list[Any]],
               runs: Sequence[tuple[int, Any]]) -> Any:
        """Run ``demonstration + row`` once per (row, edit) and take the hidden
        states of the positions routed to that edit."""
        bos = getattr(self.tok, "bos_token_id", None)
        seqs, offsets = [], []
        for b, owner in runs:
            lead = 1 if rows[b] and bos is not None and rows[b][0] == bos else 0
            demo = self.classifier.demo(owner)
            seqs.append(rows[b][:lead] + demo + rows[b][lead:])
            offsets.append((lead, len(demo)))
        width = max(len(s) for s in seqs)
        if self.limit is not None and width > self.limit:
            raise ModelError(f"with the edit's demonstration the input is {width} tokens, more "
                             f"than the model's {self.limit} positions",
                             hint="shorten the prompt, or recompile with a shorter template")
        new_ids = torch.zeros((len(seqs), width), dtype=ids.dtype, device=ids.device)
        new_mask = torch.zeros_like(new_ids)
        for i, s in enumerate(seqs):
            new_ids[i, :len(s)] = torch.tensor(s, dtype=ids.dtype)
            new_mask[i, :len(s)] = 1
        self.busy = True
        try:
            h = self.trace_module()(input_ids=new_ids, attention_mask=new_mask,
                                    use_cache=False).last_hidden_state
        finally:
            self.busy = False
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        hidden = hidden.clone()
        for i, (b, owner) in enumerate(runs):
            pos = mask[b].bool().nonzero().flatten()
            mine = torch.tensor([t for t, o in enumerate(routes[b]) if o == owner],
                                device=pos.device)
            lead, n_demo = offsets[i]
            src = torch.where(mine < lead, mine, mine + n_demo).to(h.device)
            hidden[b, pos[mine]] = h[i, src].to(hidden.dtype)
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        output.last_hidden_state = hidden
        return output

    def trace_module(self) -> Any:
        return get_module(self.model, self.path)


def _max_positions(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
