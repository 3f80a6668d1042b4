"""One pass over the corpus that fills a second-moment accumulator per layer.

Contents:
    Resume        where an interrupted pass starts again (position + states)
    PassConfig    budgets and batching of one pass
    collect()     the pass: hooks on every requested layer, stop after the deepest

For every batch the model runs forward once with a :class:`~kmec.models.hooks.TraceDict`
that retains the *input* of each requested layer's MLP output projection (the
key ``k``) and raises :class:`~kmec.models.hooks.StopForward` right after the
deepest one, so layers above it, the final norm and the unembedding are never
computed. Each layer's keys are added to its :class:`SecondMoment` with the
batch's ``counted`` mask (padding and special prefixes excluded). Memory is
one batch of activations plus one ``d × d`` float64 total per layer,
whatever the token budget.

Every ``checkpoint_s`` seconds (at pool boundaries) ``on_checkpoint`` gets
the accumulators and the stream position, so an interrupted run can resume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kmec.errors import StatsError
from kmec.models.adapters import ArchAdapter
from kmec.models.hooks import TraceDict, device_of
from kmec.progress import Progress
from kmec.stats.accumulators import SecondMoment
from kmec.stats.batches import pools
from kmec.stats.corpus import Corpus, windows

log = logging.getLogger("kmec")

CheckpointFn = Callable[[dict[int, SecondMoment], int, int], None]


@dataclass(frozen=True)
class PassConfig:
    """Budgets and batching of one statistics pass.

    Attributes:
        max_len: most tokens per window (special prefix included).
        tokens: token budget over all ranks (counted tokens).
        samples: sample (window) budget over all ranks; None for none.
        batch_tokens: most padded positions per forward batch.
        pool_size: windows sorted together for length bucketing.
        checkpoint_s: seconds between checkpoints (0: after every pool).
    """

    max_len: int
    tokens: int
    samples: int | None = None
    batch_tokens: int = 4096
    pool_size: int = 256
    checkpoint_s: float = 60.0


@dataclass
class Resume:
    """State to resume a pass from: next global window index, tokens done, accumulators."""

    position: int = 0
    tokens_done: int = 0
    states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


def collect(
    model: Any,
    tok: Any,
    adapter: ArchAdapter,
    layers: Sequence[int],
    d: int,
    corpus: Corpus,
    config: PassConfig,
    *,
    rank: int = 0,
    world: int = 1,
    kernel: str | None = None,
    products: str = "float32",
    resume: Resume | None = None,
    on_checkpoint: CheckpointFn | None = None,
    progress: Progress | None = None,
) -> dict[int, SecondMoment]:
    """Accumulate ``Σ k kᵀ`` of the MLP keys of ``layers`` in one pass.

    Args:
        model: a causal LM (not modified; hooks are removed afterwards).
        tok: its tokenizer.
        adapter: where the ``mlp_out`` sites live.
        layers: layer indices (any order; duplicates ignored).
        d: key dimension (d_mlp).
        corpus: the text.
        config: budgets and batching.
        rank, world: this process's shard of the corpus.
        kernel: XᵀX kernel override (see :mod:`kmec.kernels`).
        products: ``"float32"`` or ``"bfloat16"`` products (see :mod:`kmec.kernels`).
        resume: start from a checkpoint instead of from scratch.
        on_checkpoint: ``fn(accumulators, position, tokens_done)``.
        progress: ``fn(message, tokens_done, tokens_total)`` for this rank.

    Returns:
        layer -> this rank's (un-reduced) accumulator.

    Raises:
        StatsError: no layers, or a key of unexpected dimension.
    """
    layers = sorted(set(layers))
    if not layers:
        raise StatsError("no layers requested")
    device = device_of(model)
    resume = resume or Resume()
    acc = {l: SecondMoment(d, device=device, kernel=kernel, products=products) for l in layers}
    for l, state in resume.states.items():
        acc[l].load_state_dict(state)
    paths = [adapter.site("mlp_out", l) for l in layers]
    pad_id = getattr(tok, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    stream = windows(corpus, tok, max_len=config.max_len, tokens=config.tokens,
                     samples=config.samples)
    share = -(-config.tokens // world)  # this rank's approximate share, for progress only
    done = resume.tokens_done
    last_ckpt = time.monotonic()
    say = progress or (lambda _m, _d, _t: None)
    say(f"layers {layers[0]}-{layers[-1]}", done, share)
    for pool in pools(stream, batch_tokens=config.batch_tokens, pool_size=config.pool_size,
                      pad_id=pad_id, rank=rank, world=world, start=resume.position):
        for batch in pool.batches:
            keys = _forward(model, paths, batch.input_ids.to(device),
                            batch.attention_mask.to(device))
            counted = batch.counted.to(device)
            for l, path in zip(layers, paths):
                k = keys.pop(path)
                if k.shape[-1] != d:
                    raise StatsError(f"{path} takes inputs of size {k.shape[-1]}, expected {d}")
                acc[l].add(k, counted)
                del k  # free each layer's activations as soon as they are added
            done += batch.tokens
            say(f"layers {layers[0]}-{layers[-1]}", done, max(share, done))
        if on_checkpoint is not None and time.monotonic() - last_ckpt >= config.checkpoint_s:
            on_checkpoint(acc, pool.position, done)
            last_ckpt = time.monotonic()
    log.debug("rank %d/%d: %d tokens for layers %s", rank, world, done, layers)
    return acc


def _forward(model: Any, paths: list[str], ids: torch.Tensor,
             attn: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the model until the deepest hooked module; return each module's input."""
    with torch.inference_mode(), TraceDict(model, paths, retain_input=True, stop=True) as td:
        model(input_ids=ids, attention_mask=attn, use_cache=False)
    keys: dict[str, torch.Tensor] = {}
    for path in paths:
        x = td[path].input
        if x is None:
            raise StatsError(f"the forward pass never reached {path}")
        keys[path] = x
        td[path].input = None
    return keys
