"""Batched scoring of prompts and target continuations on one or more models.

Contents:
    Item             a prompt and an optional target continuation
    Encoded          token ids of prompt + target and where the target starts
    ItemScore        what one model says about one item
    spaced()         the target as it follows the prompt (``" Paris"``, not ``"Paris"``)
    encode_item()    tokenise prompt and target together; locate the target tokens
    score_logprobs() an ItemScore from log-probabilities at an item's positions (pure)
    score_items()    score many items on several models in right-padded batches
    ScoreCache       per-item memo over score_items (hypothesis asks the same prompts again)
    score_encoded()  the same for already-encoded items

Every item is run through every model in the same batch, so the KL divergence
between the first model (the base) and each other model at the prompt's last
position is computed on the fly and no full next-token distribution is kept.

Batches are right-padded: a causal model's real tokens only attend to earlier
real tokens and sit at positions ``0..len-1``, so padding after them changes
nothing, and each row's log-probabilities are gathered at its true positions.
Rows are sorted by length before batching to keep padding small, and an item
whose tokens are a prefix of another's is read from the longer one's row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kmec.errors import VerifyError
from kmec.models.adapters import plain_head
from kmec.models.batching import right_pad
from kmec.models.chat import ChatFrame
from kmec.models.hooks import device_of
from kmec.progress import Progress

PAD_WASTE = 0.25  # a batch is closed before more than this share of it would be padding
HEAD_POSITIONS = 256  # positions per unembedding GEMM (256 x 49k fp32 logits = 50 MB)


@dataclass(frozen=True)
class Item:
    """A prompt and, optionally, the continuation to score after it."""

    prompt: str
    target: str | None = None


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + target; ``ids[n_prompt:]`` are the target's tokens."""

    ids: tuple[int, ...]
    n_prompt: int

    @property
    def target_ids(self) -> tuple[int, ...]:
        return self.ids[self.n_prompt:]

    @property
    def positions(self) -> range:
        """Positions whose next-token distribution is read: the prompt's last
        token, then each target token but the last."""
        return range(self.n_prompt - 1, self.n_prompt - 1 + max(len(self.target_ids), 1))

    @property
    def length(self) -> int:
        """Tokens that must be fed to read every position."""
        return self.positions.stop


@dataclass(frozen=True)
class ItemScore:
    """One model's view of one item.

    Attributes:
        target_ids: the target's token ids (empty for a bare prompt).
        target_logprobs: log P(target token i | prompt, target tokens < i).
        target_hits: whether each target token is the arg-max (teacher forced).
        top_ids, top_probs: the top-k next tokens after the prompt.
        kl: KL(P_ref ‖ P_this) of the next-token distributions after the prompt,
            in nats; the reference is the first model scored (0 for it).
    """

    target_ids: tuple[int, ...]
    target_logprobs: tuple[float, ...]
    target_hits: tuple[bool, ...]
    top_ids: tuple[int, ...]
    top_probs: tuple[float, ...]
    kl: float = 0.0

    @property
    def mean_logprob(self) -> float:
        """Mean target-token log-probability (length-normalised, as CounterFact)."""
        lp = self.target_logprobs
        return sum(lp) / len(lp) if lp else 0.0

    @property
    def prob(self) -> float:
        """exp(mean target-token log-probability): a per-token probability."""
        return math.exp(self.mean_logprob)

    @property
    def token_accuracy(self) -> float:
        """Fraction of target tokens that are the teacher-forced arg-max."""
        h = self.target_hits
        return sum(h) / len(h) if h else 0.0

    @property
    def exact(self) -> bool:
        """Every target token is the arg-max: greedy decoding emits the target."""
        return bool(self.target_hits) and all(self.target_hits)

    @property
    def top1(self) -> int:
        return self.top_ids[0]


def spaced(prompt: str, target: str) -> str:
    """The target as it follows the prompt: with the separating space a
    byte-level BPE tokenizer puts in front of a word.

    >>> spaced("The capital of France is", "Paris")
    ' Paris'
    >>> spaced("Q: capital of France? A: ", "Paris"), spaced("x", " y")
    ('Paris', ' y')
    """
    if not target or target[0].isspace() or not prompt or prompt[-1].isspace():
        return target
    return " " + target


def _ids(tok: Any, text: str, special: bool = True) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def encode_item(tok: Any, item: Item, chat: ChatFrame | None = None) -> Encoded:
    """Tokenise ``prompt + spaced(target)`` together and find the target tokens.

    When the joint tokenisation starts with the prompt's own tokens, the rest
    are the target's. When a merge crosses the boundary (rare: the prompt ends
    mid-word), the target is tokenised on its own and appended. With ``chat``
    (the spec's ``chat on``) the prompt is asked as a user turn of the model's
    chat template and the target is the assistant's answer; the template's own
    markers stand for the tokenizer's special tokens, so none are added.

    Raises:
        VerifyError: the prompt has no tokens (nothing predicts the target).
    """
    prompt = item.prompt if chat is None else chat.wrap(item.prompt)
    special = chat is None
    p = _ids(tok, prompt, special)
    if not p:
        raise VerifyError(f"prompt {item.prompt!r} has no tokens, so nothing can be scored after it")
    if item.target is None:
        return Encoded(tuple(p), len(p))
    text = spaced(prompt, item.target)
    full = _ids(tok, prompt + text, special)
    if len(full) > len(p) and full[: len(p)] == p:
        return Encoded(tuple(full), len(p))
    return Encoded(tuple(p + _ids(tok, text, special=False)), len(p))


def score_logprobs(logprobs: torch.Tensor, target_ids: Sequence[int],
                   ref_first: torch.Tensor | None = None, topk: int = 5) -> ItemScore:
    """Score one item from the log-probabilities read at its positions.

    Args:
        logprobs: ``[n_positions, vocab]`` log-softmax rows; row 0 is the
            distribution after the prompt, row i the one after target token i-1.
        target_ids: the target's tokens (may be empty).
        ref_first: the reference model's row 0, for the KL divergence.
        topk: how many top next tokens to keep.

    Returns:
        The :class:`ItemScore` (``kl = Σ_v P_ref(v)·(log P_ref(v) − log P(v))``).
    """
    lp = logprobs.float()
    tgt = torch.tensor(list(target_ids), dtype=torch.long)
    if len(tgt):
        rows = lp[: len(tgt)]
        t_lp = rows.gather(1, tgt[:, None]).squeeze(1)
        hits = rows.argmax(dim=1) == tgt
        target_lp, target_hits = tuple(t_lp.tolist()), tuple(bool(h) for h in hits.tolist())
    else:
        target_lp, target_hits = (), ()
    k = min(topk, lp.shape[1])
    top = lp[0].topk(k)
    kl = 0.0
    if ref_first is not None:
        ref = ref_first.float()
        kl = max(float((ref.exp() * (ref - lp[0])).sum()), 0.0)
    return ItemScore(tuple(target_ids), target_lp, target_hits, tuple(top.indices.tolist()),
                     tuple(top.values.exp().tolist()), kl)


# ---------------------------------------------------------------- batched forward


def _hidden(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Final hidden states and the head that maps them to logits (or logits
    and an identity head for families whose head is not a plain linear map)."""
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if plain_head(model.config.model_type) and body is not None and body is not model \
            and head is not None:
        out = body(input_ids=ids, attention_mask=mask, use_cache=False)
        return out.last_hidden_state, head
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits, None


@dataclass
class _Row:
    """One sequence fed to the models and the items read from it.

    ``reads`` are ``(item index, first position, target ids)``: an item whose
    tokens are a prefix of another item's tokens is read from that item's
    row, since a causal model's output at a position only depends on the
    tokens up to it. Corpus-prefix probes ("The river rises", "The river
    rises in a", ...) then cost one forward pass per sentence.
    """

    ids: tuple[int, ...]
    reads: list[tuple[int, int, tuple[int, ...]]]

    @property
    def positions(self) -> list[int]:
        want = {p for _, first, t in self.reads for p in range(first, first + max(len(t), 1))}
        return sorted(want)


def _rows(encoded: Sequence[Encoded]) -> list[_Row]:
    """Group items so that each is read from the longest item it is a prefix of.

    In lexicographic order a sequence is directly followed by its extensions,
    so walking backwards, an item that is a prefix of the next one shares
    the next one's host.
    """
    needed = [e.ids[: e.length] for e in encoded]
    order = sorted(range(len(encoded)), key=lambda i: (needed[i], i))
    host: dict[int, int] = {}
    for k in range(len(order) - 1, -1, -1):
        i = order[k]
        nxt = order[k + 1] if k + 1 < len(order) else None
        if nxt is not None and needed[nxt][: len(needed[i])] == needed[i]:
            host[i] = host[nxt]
        else:
            host[i] = i
    rows: dict[int, _Row] = {}
    for i in range(len(encoded)):
        h = host[i]
        if h not in rows:
            rows[h] = _Row(needed[h], [])
        rows[h].reads.append((i, encoded[i].n_prompt - 1, encoded[i].target_ids))
    return [rows[h] for h in sorted(rows)]


def _pad(rows: Sequence[_Row], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return right_pad([r.ids for r in rows], pad_id, device)


def _score_batch(models: Sequence[Any], rows: Sequence[_Row], pad_id: int,
                 topk: int, refs: dict[int, torch.Tensor] | None = None,
                 given: bool = False) -> dict[int, tuple[ItemScore, ...]]:
    """Run ``rows`` through every model; score each read (KL against model 0).

    ``refs``: the reference distributions (model 0's first row per item), written
    to it; with ``given`` they are read from it instead and model 0 is not run
    (``models`` are the others).
    """
    refs = {} if refs is None else refs
    per_item: dict[int, list[ItemScore]] = {}
    for mi, model in enumerate(models, start=1 if given else 0):
        ids, mask = _pad(rows, pad_id, device_of(model))
        with torch.no_grad():
            hidden, head = _hidden(model, ids, mask)
            for group in _head_groups(rows):
                # the positions read from a group of rows go through the head in one GEMM
                where = [(r, p) for r in group for p in rows[r].positions]
                at = {rp: k for k, rp in enumerate(where)}
                h = hidden[[r for r, _ in where], [p for _, p in where]]
                lp = (head(h) if head is not None else h).float().log_softmax(-1).cpu()
                for r in group:
                    for item, first, target in rows[r].reads:
                        start = at[(r, first)]
                        mine = lp[start: start + max(len(target), 1)]
                        if mi == 0:
                            refs[item] = mine[0].clone()  # not a view of the whole block
                        per_item.setdefault(item, []).append(
                            score_logprobs(mine, target, refs[item] if mi else None, topk))
    return {i: tuple(s) for i, s in per_item.items()}


def _head_groups(rows: Sequence[_Row], max_positions: int = HEAD_POSITIONS) -> list[list[int]]:
    """Row indices in groups of at most ``max_positions`` read positions (a
    longer row alone): bounds the [positions, vocab] log-prob block in memory."""
    groups: list[list[int]] = [[]]
    n = 0
    for r, row in enumerate(rows):
        k = len(row.positions)
        if groups[-1] and n + k > max_positions:
            groups.append([])
            n = 0
        groups[-1].append(r)
        n += k
    return groups


def _batches(rows: Sequence[_Row], max_batch_tokens: int,
             max_waste: float = PAD_WASTE) -> list[list[_Row]]:
    """Rows sorted by length, in batches of at most ``max_batch_tokens`` padded
    tokens, of which at most ``max_waste`` may be padding (padding is compute
    thrown away; on a CPU it costs as much as real tokens)."""
    batches: list[list[_Row]] = []
    cur: list[_Row] = []
    real = 0
    for row in sorted(rows, key=lambda r: (len(r.ids), r.ids)):
        width = len(row.ids)  # sorted: the newest row is the widest
        padded = (len(cur) + 1) * width
        if cur and (padded > max_batch_tokens or padded > (1 + max_waste) * (real + width)):
            batches.append(cur)
            cur, real = [], 0
        cur.append(row)
        real += width
    if cur:
        batches.append(cur)
    return batches


def pad_id_of(tok: Any) -> int:
    pid = getattr(tok, "pad_token_id", None)
    if pid is None:
        pid = getattr(tok, "eos_token_id", None)
    return int(pid or 0)


def score_encoded(models: Sequence[Any], encoded: Sequence[Encoded], *, pad_id: int = 0,
                  max_batch_tokens: int = 2048, topk: int = 5,
                  progress: Progress | None = None,
                  refs: dict[int, torch.Tensor] | None = None) -> list[tuple[ItemScore, ...]]:
    """Score already-encoded items on every model (see :func:`score_items`).

    ``refs`` (item index -> model 0's distribution after the prompt): an empty dict
    is filled; a full one stands for model 0, which ``models`` then leave out.
    """
    out: dict[int, tuple[ItemScore, ...]] = {}
    given = refs is not None and len(refs) == len(encoded) > 0
    for batch in _batches(_rows(encoded), max_batch_tokens):
        out.update(_score_batch(models, batch, pad_id, topk, refs, given))
        if progress is not None:
            progress("scoring", len(out), len(encoded))
    return [out[i] for i in range(len(encoded))]


def score_items(models: Sequence[Any], tok: Any, items: Sequence[Item], *,
                max_batch_tokens: int = 2048, topk: int = 5,
                progress: Progress | None = None,
                chat: ChatFrame | None = None) -> list[tuple[ItemScore, ...]]:
    """Score ``items`` on every model in right-padded, length-sorted batches.

    Args:
        models: causal LMs; the first is the reference for ``ItemScore.kl``.
        tok: their (shared) tokenizer.
        items: prompts with optional targets.
        max_batch_tokens: padded tokens per batch (rows × widest row).
        topk: top next tokens kept per item.
        progress: ``progress("scoring", done, total)``.
        chat: the chat template's frame when the spec says ``chat on``
            (see :func:`encode_item`).

    Returns:
        One tuple per item, one :class:`ItemScore` per model, in input order.
    """
    encoded = [encode_item(tok, it, chat) for it in items]
    return score_encoded(models, encoded, pad_id=pad_id_of(tok),
                         max_batch_tokens=max_batch_tokens, topk=topk, progress=progress)


@dataclass
class BaseMemo:
    """The base model's side of scored items, kept across scorings of several edited
    models against the same base (compile's repair loop): each item's base score and
    its distribution after the prompt (the KL reference). About vocab × 4 bytes per
    item (~200 KB for SmolLM2)."""

    scores: dict[Item, tuple[ItemScore, torch.Tensor]] = field(default_factory=dict)

    def fill(self, base: Any, tok: Any, items: Sequence[Item], *, chat: ChatFrame | None = None,
             max_batch_tokens: int = 2048, topk: int = 5,
             progress: Progress | None = None) -> None:
        """Score ``items`` (those not known yet) on ``base`` alone and keep them."""
        new = [it for it in dict.fromkeys(items) if it not in self.scores]
        if not new:
            return
        refs: dict[int, torch.Tensor] = {}
        scores = score_encoded([base], [encode_item(tok, it, chat) for it in new],
                               pad_id=pad_id_of(tok), max_batch_tokens=max_batch_tokens,
                               topk=topk, progress=progress, refs=refs)
        for i, (it, sc) in enumerate(zip(new, scores)):
            self.scores[it] = (sc[0], refs[i])


class ScoreCache:
    """Scores of items on fixed models, computed once per item.

    ``prefetch`` scores every missing item in batches; ``get`` scores a
    missing item alone (hypothesis's shrinker asks for prompts nobody
    predicted). ``items_scored`` counts items actually run through the models.
    With a :class:`BaseMemo` (two models, the first the base) an item the memo
    knows runs through the edited model only. ``chat``: items' prompts are asked
    through the model's chat template (:func:`encode_item`); items stay unwrapped.
    """

    def __init__(self, models: Sequence[Any], tok: Any, *, max_batch_tokens: int = 2048,
                 topk: int = 5, memo: BaseMemo | None = None,
                 chat: ChatFrame | None = None) -> None:
        self.models = tuple(models)
        self.tok = tok
        self.chat = chat
        self.max_batch_tokens = max_batch_tokens
        self.topk = topk
        self.memo = memo if len(self.models) == 2 else None
        self._store: dict[Item, tuple[ItemScore, ...]] = {}
        self.items_scored = 0
        self.lookups = 0

    def __contains__(self, item: Item) -> bool:
        return item in self._store

    def prefetch(self, items: Iterable[Item], progress: Progress | None = None) -> None:
        """Score every item not yet cached, batched."""
        missing = [it for it in dict.fromkeys(items) if it not in self._store]
        if not missing:
            return
        self.items_scored += len(missing)
        if self.memo is None:
            scores = score_items(self.models, self.tok, missing,
                                 max_batch_tokens=self.max_batch_tokens, topk=self.topk,
                                 progress=progress, chat=self.chat)
            self._store.update(zip(missing, scores))
            return
        memo = self.memo.scores
        known = [it for it in missing if it in memo]
        new = [it for it in missing if it not in memo]
        pad = pad_id_of(self.tok)
        if new:
            refs: dict[int, torch.Tensor] = {}
            scores = score_encoded(self.models, [encode_item(self.tok, it, self.chat)
                                                 for it in new],
                                   pad_id=pad, max_batch_tokens=self.max_batch_tokens,
                                   topk=self.topk, progress=progress, refs=refs)
            for i, (it, sc) in enumerate(zip(new, scores)):
                memo[it] = (sc[0], refs[i])
                self._store[it] = sc
        if known:
            refs = {i: memo[it][1] for i, it in enumerate(known)}
            scores = score_encoded(self.models[1:], [encode_item(self.tok, it, self.chat)
                                                     for it in known],
                                   pad_id=pad, max_batch_tokens=self.max_batch_tokens,
                                   topk=self.topk, progress=progress, refs=refs)
            for it, sc in zip(known, scores):
                self._store[it] = (memo[it][0], *sc)

    def get(self, item: Item) -> tuple[ItemScore, ...]:
        """The scores of ``item`` on each model (scored now if not cached)."""
        self.lookups += 1
        if item not in self._store:
            self.prefetch([item])
        return self._store[item]
