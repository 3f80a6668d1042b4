"""The statistics engine: cached second moments for a plan's StatsRequest.

Contents:
    DEFAULT_TOKENS, DEFAULT_MAX_LEN   budgets the planner records by default
    MomentProvider    a StatsProvider: ``second_moment(layer)`` for requested layers
    provider()        build one (what backends and the CLI call)
    stats_keys()      the cache key of every requested layer
    cached_layers()   the requested layers the cache already holds (for estimates)

``MomentProvider.prepare()`` (called by the first ``second_moment``) looks
every requested layer up in the cache and computes all missing layers in
*one* pass that stops after the deepest of them, then writes the new entries.
Under torchrun the pass is sharded and reduced (:mod:`kmec.stats.distributed`);
rank 0 writes the cache. A pass checkpoints its accumulators periodically and
an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from kmec.errors import StatsError
from kmec.models.adapters import ArchAdapter
from kmec.models.facts import ModelFacts
from kmec.models.load import fingerprint_model, tokenizer_hash
from kmec.progress import Progress
from kmec.stats import distributed
from kmec.stats.accumulators import SecondMoment
from kmec.stats.cache import StatsCache, StatsKey
from kmec.stats.collect import PassConfig, Resume, collect
from kmec.stats.corpus import Corpus, resolve_corpus

if TYPE_CHECKING:  # only its fields are read; importing kmec.planner would pull in every pass
    from kmec.planner.model import StatsRequest

log = logging.getLogger("kmec")

# 100k tokens is ~2 % of the reference implementations' 100,000-article
# budget; arXiv:2506.04226 reports that a small fraction of it gives edits
# of the same quality. max_len caps every window (never the full context).
DEFAULT_TOKENS = 100_000
DEFAULT_MAX_LEN = 256


def _model_dtype(model: Any) -> str:
    try:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    except StopIteration:
        return "float32"


def _tokenizer_id(tok: Any) -> str:
    try:
        return tokenizer_hash(tok)
    except (AttributeError, TypeError, NotImplementedError):
        # Test doubles without a vocabulary: identify them by class and size.
        from kmec.hashing import sha256_text

        name = f"{type(tok).__module__}.{type(tok).__qualname__}:{getattr(tok, 'vocab_size', '')}"
        return sha256_text(name)


def stats_keys(model: Any, tok: Any, facts: ModelFacts, adapter: ArchAdapter,
               request: StatsRequest, corpus: Corpus, *,
               samples: int | None = None) -> dict[int, StatsKey]:
    """The cache key of each requested layer (computes the model fingerprint if facts lack it)."""
    fp = facts.fingerprint or fingerprint_model(model)
    dtype = _model_dtype(model)
    if dtype != request.dtype:
        log.warning("stats requested in %s but the model runs in %s; keys record %s",
                    request.dtype, dtype, dtype)
    return _keys(fp, dtype, _tokenizer_id(tok), adapter, request, corpus, samples)


def _keys(fingerprint: str, dtype: str, tok_id: str, adapter: ArchAdapter,
          request: StatsRequest, corpus: Corpus, samples: int | None) -> dict[int, StatsKey]:
    return {
        layer: StatsKey(model_fingerprint=fingerprint, module=adapter.site(request.site, layer),
                        layer=layer, corpus_fingerprint=corpus.fingerprint,
                        tokenizer_hash=tok_id, max_len=request.max_len, dtype=dtype,
                        max_samples=samples, products=request.products)
        for layer in sorted(set(request.layers))
    }


def cached_layers(facts: ModelFacts, tok: Any, adapter: ArchAdapter, request: StatsRequest, *,
                  cache: StatsCache | None = None, corpus: str | Corpus | None = None,
                  samples: int | None = None) -> tuple[int, ...]:
    """The requested layers whose moments ``cache`` already holds (no weights needed).

    The keys are the ones :meth:`MomentProvider.prepare` looks up for a model loaded
    in ``facts.dtype``, so a layer listed here is served from the cache by a compile
    of the same model, tokenizer, corpus and budgets. ``facts.fingerprint`` must be
    set (``facts_for_ref`` sets it).
    """
    if not facts.fingerprint:
        return ()
    keys = _keys(facts.fingerprint, facts.dtype, _tokenizer_id(tok), adapter, request,
                 resolve_corpus(corpus if corpus is not None else request.corpus), samples)
    cache = cache or StatsCache()
    return tuple(layer for layer, key in keys.items()
                 if cache.lookup(key, request.tokens) is not None)


class MomentProvider:
    """Second moments ``E[k kᵀ]`` for the layers of one StatsRequest (a StatsProvider).

    Build it with :func:`provider`. Nothing runs until :meth:`prepare` or the
    first :meth:`second_moment`.
    """

    def __init__(self, model: Any, tok: Any, facts: ModelFacts, adapter: ArchAdapter,
                 request: StatsRequest, *, corpus: Corpus, cache: StatsCache,
                 config: PassConfig, kernel: str | None,
                 progress: Progress | None) -> None:
        self.model, self.tok, self.facts, self.adapter = model, tok, facts, adapter
        self.request, self.corpus, self.cache, self.config = request, corpus, cache, config
        self.kernel, self.progress = kernel, progress
        self._moments: dict[int, SecondMoment] | None = None
        self.sources: dict[int, str] = {}

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.request.layers)))

    def second_moment(self, layer: int) -> torch.Tensor:
        """``E[k kᵀ]`` of ``layer``'s MLP keys: [d_mlp, d_mlp] float32 on the model's device.

        Raises:
            StatsError: ``layer`` is not in the request.
        """
        if layer not in self.layers:
            raise StatsError(f"layer {layer} was not requested (requested: {list(self.layers)})",
                             hint="add the layer to the StatsRequest")
        sm = self.prepare()[layer]
        device = next(iter(self.model.parameters())).device
        return sm.moment(torch.float32).to(device)

    def count(self, layer: int) -> int:
        """Tokens behind ``layer``'s moment."""
        return self.prepare()[layer].count

    def prepare(self) -> dict[int, SecondMoment]:
        """Load or compute every requested layer (one pass for all missing ones)."""
        if self._moments is not None:
            return self._moments
        keys = stats_keys(self.model, self.tok, self.facts, self.adapter, self.request,
                          self.corpus, samples=self.config.samples)
        dist = distributed.current()
        found = {l: self.cache.lookup(k, self.config.tokens) for l, k in keys.items()}
        missing = distributed.broadcast(sorted(l for l, e in found.items() if e is None))
        moments: dict[int, SecondMoment] = {}
        for layer, entry in found.items():
            if layer in missing:
                continue
            # Under torchrun rank 0 decides; another rank may have looked before a write landed.
            entry = entry or self.cache.lookup(keys[layer], self.config.tokens)
            if entry is None:
                raise StatsError(f"rank {dist.rank} cannot read the cached stats of layer {layer}",
                                 hint="put the stats cache (KMEC_HOME) on storage every rank sees")
            moments[layer] = self.cache.load(entry)
            self.sources[layer] = f"cache ({entry.tokens} tokens)"
        if missing:
            moments.update(self._compute({l: keys[l] for l in missing}, dist))
        self._moments = moments
        return moments

    def _compute(self, keys: dict[int, StatsKey],
                 dist: distributed.DistInfo) -> dict[int, SecondMoment]:
        ckpt = self.cache.checkpoint_path(keys.values(), self.config.tokens, dist.rank, dist.world)
        resume = Resume()
        loaded = self.cache.load_checkpoint(ckpt)
        if loaded is not None and set(loaded[2]) == set(keys):
            resume = Resume(*loaded)
            log.info("resuming the statistics pass at window %d (%d tokens done)",
                     resume.position, resume.tokens_done)

        def save(acc: dict[int, SecondMoment], position: int, done: int) -> None:
            self.cache.save_checkpoint(ckpt, acc, position, done)

        log.info("collecting key statistics for layers %s over %d tokens of %s",
                 sorted(keys), self.config.tokens, self.corpus.name)
        acc = collect(self.model, self.tok, self.adapter, sorted(keys), self.facts.d_mlp,
                      self.corpus, self.config, rank=dist.rank, world=dist.world,
                      kernel=self.kernel, products=self.request.products, resume=resume, on_checkpoint=save,
                      progress=self.progress)
        distributed.all_reduce_moments(acc)
        total = next(iter(acc.values())).count
        exhausted = total < self.config.tokens
        if exhausted:
            log.warning("the corpus %s gave only %d of %d tokens", self.corpus.name, total,
                        self.config.tokens)
        if total == 0:
            raise StatsError(f"the corpus {self.corpus.name!r} gave no tokens",
                             hint="check the corpus file, or use --corpus default")
        for layer, key in keys.items():
            if dist.is_main:
                self.cache.save(key, acc[layer], requested=self.config.tokens,
                                exhausted=exhausted, corpus=self.corpus.name,
                                model=self.facts.name)
            self.sources[layer] = f"computed ({acc[layer].count} tokens)"
        self.cache.drop_checkpoint(ckpt)
        distributed.barrier()
        return acc


def provider(
    model: Any,
    tok: Any,
    facts: ModelFacts,
    adapter: ArchAdapter,
    request: StatsRequest,
    *,
    corpus: str | Corpus | None = None,
    cache: StatsCache | None = None,
    progress: Progress | None = None,
    kernel: str | None = None,
    batch_tokens: int | None = None,
    samples: int | None = None,
    pool_size: int = 256,
    checkpoint_s: float = 60.0,
) -> MomentProvider:
    """A StatsProvider for ``request`` (lazy: the pass runs on first use).

    Args:
        model, tok, facts, adapter: the loaded model (never modified).
        request: the plan's StatsRequest (site, layers, corpus, tokens, max_len, dtype).
        corpus: overrides ``request.corpus`` (a name, path or Corpus).
        cache: where moments are cached (default ``kmec_home()/stats``).
        progress: ``fn(message, tokens_done, tokens_total)``.
        kernel: XᵀX kernel override: "torch" | "triton" (default: by device).
        batch_tokens: padded positions per forward batch (default 4096 on CPU,
            16384 on CUDA); does not change the numbers.
        samples: optional sample (window) budget; part of the cache key.
        pool_size: windows sorted together for length bucketing (and the
            granularity of checkpoints); does not change the numbers.
        checkpoint_s: seconds between checkpoints of a running pass.

    Raises:
        StatsError: bad budgets or corpus.
    """
    if request.tokens < 1:
        raise StatsError(f"token budget must be positive, got {request.tokens}")
    if request.max_len < 2:
        raise StatsError(f"max_len must be at least 2, got {request.max_len}")
    if not request.layers:
        raise StatsError("the StatsRequest names no layers")
    bad = [l for l in request.layers if not 0 <= l < facts.n_layers]
    if bad:
        raise StatsError(f"layers {bad} out of range for a {facts.n_layers}-layer model")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and request.max_len > int(limit):
        raise StatsError(f"max_len {request.max_len} exceeds the model's context ({limit})",
                         hint=f"use --max-len {limit} or less")
    device = next(iter(model.parameters())).device
    if batch_tokens is None:
        batch_tokens = 16384 if device.type == "cuda" else 4096
    config = PassConfig(max_len=request.max_len, tokens=request.tokens, samples=samples,
                        batch_tokens=max(batch_tokens, request.max_len), pool_size=pool_size,
                        checkpoint_s=checkpoint_s)
    return MomentProvider(model, tok, facts, adapter, request,
                          corpus=resolve_corpus(corpus if corpus is not None else request.corpus),
                          cache=cache or StatsCache(), config=config, kernel=kernel,
                          progress=progress)
