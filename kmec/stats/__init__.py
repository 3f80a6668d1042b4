"""The statistics engine: second moments ``E[k kᵀ]`` of MLP keys, in one pass.

What backends call (ROME, MEMIT, AlphaEdit)::

    from kmec.stats import provider

    stats = provider(model, tok, facts, adapter, step.needs_stats, progress=ctx.progress)
    C = stats.second_moment(layer)     # [d_mlp, d_mlp] float32, on the model's device

``provider(model, tok, facts, adapter, request: StatsRequest, *, corpus=None,
cache=None, progress=None, kernel=None, batch_tokens=None, samples=None,
checkpoint_s=60.0) -> MomentProvider`` is lazy; the first ``second_moment``
loads every requested layer from the cache and computes all missing ones in
a single pass over the corpus that stops after the deepest of them.

    E[k kᵀ] = (1/n) Σ_t k_t k_tᵀ

over the ``n`` non-padding tokens ``t`` of the corpus, where ``k_t`` is the
input of the layer's MLP output projection (``adapter.site("mlp_out", l)``).

Contents:
    DEFAULT_TOKENS, DEFAULT_MAX_LEN   default budgets (planner records them)
    provider(), MomentProvider        the StatsProvider backends use
    SecondMoment                      mergeable accumulator (accumulators.py)
    StatsCache, StatsKey              content-addressed cache (cache.py)
    Corpus, resolve_corpus()          corpora and the default one (corpus.py)
    collect(), PassConfig             the one-pass collector (collect.py)
    distributed                       torchrun sharding + all-reduce (distributed.py)
"""

from __future__ import annotations

from kmec.stats.accumulators import SecondMoment
from kmec.stats.cache import StatsCache, StatsKey
from kmec.stats.collect import PassConfig, collect
from kmec.stats.corpus import DEFAULT_CORPUS, Corpus, resolve_corpus
from kmec.stats.engine import DEFAULT_MAX_LEN, DEFAULT_TOKENS, MomentProvider, provider, stats_keys

__all__ = [
    "DEFAULT_CORPUS",
    "DEFAULT_MAX_LEN",
    "DEFAULT_TOKENS",
    "Corpus",
    "MomentProvider",
    "PassConfig",
    "SecondMoment",
    "StatsCache",
    "StatsKey",
    "collect",
    "provider",
    "resolve_corpus",
    "stats_keys",
]
