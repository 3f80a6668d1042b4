"""The scope classifier of a retrieval memory: which edit, if any, a text is in scope of.

Contents:
    EMBED_BATCH / QUERY_CACHE   encoder batch size; decisions a classifier remembers
    load_embedder_cached()  the sentence encoder and its fingerprint (one load per process)
    embed()            mean-pooled, L2-normalised sentence embeddings
    segments()         the texts a query is judged by: whole text and last sentence
    ScopeClassifier    runtime routing: each position of each row -> an edit or None

The retrieval backend (:mod:`kmec.backends.retrieval`) compiles the keys and
thresholds; the memory runtime (:mod:`kmec.artifacts.memory`) routes with
them when an artifact is applied. A query ``q`` is in scope of key ``k_j``
when, with ``E`` the embedder (mean pooling, unit norm)::

    s(q, k_j) = max over segments t of q:  E(t) · k_j          (cosine similarity)
    j* = argmax_j s(q, k_j);   in scope  iff  s(q, k_j*) ≥ 1 − radius_j*
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from kmec.artifacts.payloads import MemoryTable
from kmec.errors import ArtifactError, ModelError
from kmec.models.hooks import device_of

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
EMBED_BATCH = 64
QUERY_CACHE = 200_000  # query texts whose decision a classifier remembers


@functools.lru_cache(maxsize=2)
def load_embedder_cached(ref: str) -> tuple[Any, Any, str]:
    """``(model, tokenizer, fingerprint)`` of the sentence encoder ``ref``.

    Cached per process: the encoder is read-only, and every retrieval table
    (and every compile step) would otherwise load and hash it again.

    Raises:
        ModelError: the encoder cannot be installed or loaded.
    """
    from kmec.models.load import ALIASES, fingerprint_model, install_alias, load_embedder

    if ref in ALIASES:
        install_alias(ref)
    model, tok = load_embedder(ref)
    model.requires_grad_(False)
    return model, tok, fingerprint_model(model)


@torch.no_grad()
def embed(model: Any, tok: Any, texts: Sequence[str], *, max_length: int = 256) -> torch.Tensor:
    """Unit-norm mean-pooled embeddings ``[len(texts), d]`` (float32, CPU).

    ``e(t) = normalise(Σ_i m_i h_i / Σ_i m_i)`` over the encoder's last hidden
    states ``h`` and attention mask ``m`` (the all-MiniLM-L6-v2 recipe).
    """
    device = device_of(model)
    out = []
    for start in range(0, len(texts), EMBED_BATCH):
        chunk = [t if t.strip() else "." for t in texts[start:start + EMBED_BATCH]]
        batch = tok(chunk, padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt").to(device)
        h = model(**batch).last_hidden_state.float()
        m = batch["attention_mask"].unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1))
    if not out:
        return torch.zeros(0, getattr(model.config, "hidden_size", 1))
    return torch.cat(out).cpu()


def segments(text: str) -> list[str]:
    """The texts a query is judged by: the whole text and, if different, its last sentence.

    >>> segments("It rained. The capital of France is")
    ['It rained. The capital of France is', 'The capital of France is']
    >>> segments("The capital of France is")
    ['The capital of France is']
    """
    whole = text.strip()
    parts = [p.strip() for p in _SENTENCE_END.split(whole) if p.strip()]
    last = parts[-1] if parts else whole
    return [whole] if last == whole else [whole, last]


def best_per_query(sims: torch.Tensor, owners: Sequence[int]) -> list[torch.Tensor]:
    """Per segment group, the max similarity (rows = segments of one query)."""
    out, start = [], 0
    for n in owners:
        out.append(sims[start:start + n].max(dim=0).values)
        start += n
    return out


class ScopeClassifier:
    """Routes token sequences: the demonstration's token ids when in scope, else None.

    Built from one or more retrieval tables (all compiled with the same
    embedder); the nearest key over all of them decides.
    """

    def __init__(self, keys: torch.Tensor, radius: torch.Tensor, owner: list[tuple[int, int]],
                 tables: Sequence[MemoryTable], tok: Any) -> None:
        meta = tables[0].meta
        self.model, self.etok, fp = load_embedder_cached(meta["embedder"])
        for t in tables:
            if t.meta.get("embedder_fingerprint") != fp:
                raise ModelError(
                    f"the retrieval memory was compiled with embedder {t.meta.get('embedder')!r} "
                    f"(fingerprint {str(t.meta.get('embedder_fingerprint'))[:12]}), but the one "
                    f"installed here has fingerprint {fp[:12]}",
                    hint="install the embedder the artifact names, or recompile the spec")
        self.keys, self.radius, self.owner, self.tables, self.tok = keys, radius, owner, tables, tok
        self.max_length = int(meta.get("max_length", 256))
        self._queries: OrderedDict[str, tuple[int, int] | None] = OrderedDict()
        self._demos: dict[tuple[int, int], list[int]] = {}

    @classmethod
    def from_tables(cls, tables: Sequence[MemoryTable], tok: Any) -> ScopeClassifier:
        refs = {t.meta.get("embedder") for t in tables}
        if len(refs) != 1:
            raise ArtifactError(f"retrieval tables compiled with different embedders {sorted(refs)} "
                                "cannot share one model", hint="recompile them with one embedder")
        keys = torch.cat([t.keys.float() for t in tables])
        radius = torch.cat([t.radius.float() for t in tables])
        owner = [(ti, int(v)) for ti, t in enumerate(tables) for v in t.values.tolist()]
        return cls(keys, radius, owner, tables, tok)

    def decide(self, texts: Sequence[str]) -> list[tuple[int, int] | None]:
        """For each text, the (table, edit) it is in scope of, or None."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._queries]
        if missing:
            segs = [segments(t) for t in missing]
            flat = embed(self.model, self.etok, [s for g in segs for s in g],
                         max_length=self.max_length)
            for text, sims in zip(missing, best_per_query(flat @ self.keys.T, [len(g) for g in segs])):
                j = int(sims.argmax())
                inside = bool(sims[j] >= 1.0 - self.radius[j] - 1e-6)
                self._queries[text] = self.owner[j] if inside else None
                if len(self._queries) > QUERY_CACHE:
                    self._queries.popitem(last=False)
        return [self._queries[t] for t in texts]

    def route(self, rows: Sequence[list[int]]) -> list[list[tuple[int, int] | None]]:
        """For each row of token ids and each of its positions, the edit whose
        scope the text up to and including that token is in (None: no edit)."""
        prefixes = [[self.tok.decode(r[:t + 1], skip_special_tokens=True) for t in range(len(r))]
                    for r in rows]
        flat = self.decide([t for p in prefixes for t in p])
        out, start = [], 0
        for p in prefixes:
            out.append(flat[start:start + len(p)])
            start += len(p)
        return out

    def demo(self, owner: tuple[int, int]) -> list[int]:
        if owner not in self._demos:
            table, edit = owner
            meta = self.tables[table].meta
            e = meta["edits"][edit]
            text = meta["template"].format(prompt=e["prompt"], target=e["target"])
            self._demos[owner] = list(self.tok.encode(text, add_special_tokens=False))
        return self._demos[owner]
