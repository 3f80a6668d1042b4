"""GRACE-style codebook adapter: an external key → value memory at one MLP, weights untouched.

Contents:
    MemoryParams     key position, radii, value training (documented defaults)
    Occurrence       one prompt that an entry must serve (edit prompt or scope prompt)
    Codebook         entries under construction: keys, radii, labels, members
    grace_insert()   GRACE's add / expand / split rule for one new key (pure)
    exclude()        shrink radii so that no ``preserve`` state falls inside (pure)
    Memory           the backend (``name = "memory"``)

Model states and the value training live in :mod:`kmec.backends.memory_values`.

Hartvigsen et al. 2023 ("Aging with GRACE"), adapted. The codebook wraps the
MLP of block ``layer`` (the layer comes from the plan). A *key* is the MLP's
input at one token; a *value* replaces the MLP's output at every position whose
input is within the *deferral radius* of its nearest key (see
:func:`kmec.artifacts.memory.codebook_lookup`).

Which token: with ``key = "subject"`` (default) the last token of the edit's
subject, as ROME keys its edits, so that paraphrases naming the same subject
reach the same entry; with ``key = "last"`` the prompt's last token, as GRACE
does. A free-form edit without a subject is keyed on its last token either way.
Measured on the embedded model (20 CounterFact records, MLP input at the
subject's last token): at layer 5 the paraphrases' keys lie within 0.16–0.76
‖k‖ of the edit's key while every token of every neighbourhood prompt is
≥ 0.91 ‖k‖ away (19 of 20 records separable); at layer 25 only 5 of 20 are.

Building the codebook (GRACE, Alg. 1). Occurrences are taken in order: each
edit's prompt, then (``use_scope``) its scope prompts. For an occurrence with
key ``k`` and label ``y``, let ``j`` be the nearest entry and ``d = ‖k − k_j‖``,
``ε = init_radius · ‖k‖``:

* no entry, or ``d > r_j + ε``                 → add ``(k, ε)``;
* ``d ≤ r_j + ε`` and ``y ≠ y_j`` (conflict)  → add ``(k, d/2)`` and set
  ``r_j = min(r_j, d/2 − 1e-6·d)``, so the two balls no longer overlap;
* ``d ≤ r_j + ε`` and ``y = y_j``             → the occurrence joins entry ``j``,
  whose radius grows to ``max(r_j, d)`` ("coverage" expansion).

The label is what an entry stands for: the subject for subject keys (two edits
of one subject share one entry, whose value is trained for both facts), the
target for last-token keys (GRACE's label). ``init_radius`` is relative to the
key's norm, so it does not depend on the model's activation scale.

Preserve prompts (``use_preserve``): the MLP inputs at *every* token of the
step's declared locality set (its edits' ``preserve`` prompts and the step's
``protect`` prompts: the listed neighbours a locality claim samples) are
negatives; an entry whose ball contains one
shrinks to ``margin`` times the distance of the nearest, and members no longer
covered become entries of their own (same rule). A negative at distance 0 (the
same state, e.g. a preserve prompt that repeats the edit prompt's beginning up
to the subject) cannot be excluded; it is logged.

Values. Each entry's value ``v_j`` (initialised to the mean MLP output of its
members) maximises the targets' likelihood with the MLP output at the key
position replaced by ``v_j``, in each member prompt under seeded context
prefixes (as ROME's δ)::

    L(v_j) = mean over member rows −log P(target | prefix + prompt; out[key] = v_j)
             + kl_weight · KL(P₀(· | "{subject} is a") ‖ P(· | ...; out[subj] = v_j))

by Adam until every member's mean target probability passes ``stop_prob``
(subject labels only carry the KL term: it keeps what the model says about the
subject otherwise). Training replaces the output at the key position only; at
inference any position within the radius is replaced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kmec.artifacts.payloads import MemoryTable, Payload
from kmec.backends.base import ExecContext
from kmec.backends.memory_values import all_states, states_at, train_values
from kmec.errors import BackendError
from kmec.models.facts import ModelFacts
from kmec.planner import costs
from kmec.planner.backend_info import BackendInfo, Work
from kmec.planner.model import EditRequest, Step

SPLIT_GAP = 1e-6  # relative gap left between two split balls


class MemoryParams(BaseModel):
    """Codebook hyper-parameters (the layer comes from the step).

    Attributes:
        key: which token keys an edit: its subject's last token or the prompt's last.
        init_radius: ε relative to the key's norm (GRACE's ``init_epsilon``).
        use_scope: scope prompts enter the codebook as occurrences of their edit.
        use_preserve: shrink radii so that no token of a preserve prompt fires.
        margin: a shrunk radius is this fraction of the nearest negative's distance.
        steps, lr, stop_prob: Adam steps, rate and early stop of the value training
            (lr 1.0 as GRACE's ``edit_lr``; on 4 CounterFact edits at layer 5 it stopped
            after 18 steps, lr 0.5 after 38, lr 0.1 ran all 50).
        kl_weight: weight of the "{subject} is a" KL term.
        n_prefixes, prefix_len: seeded context prefixes the values are trained under.
        edit_batch, max_tokens: entries trained together, at most this many and about
            this many padded tokens per batch (rows × widest row, the contexts
            included; ROME-sized batches: 16 edits × 11 contexts × ~12 tokens).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: Literal["subject", "last"] = "subject"
    init_radius: float = Field(default=0.6, gt=0)
    use_scope: bool = True
    use_preserve: bool = True
    margin: float = Field(default=0.9, gt=0, le=1)
    steps: int = Field(default=50, ge=1)
    lr: float = Field(default=1.0, gt=0)
    stop_prob: float = Field(default=0.95, gt=0, le=1)
    kl_weight: float = Field(default=0.0625, ge=0)
    n_prefixes: int = Field(default=4, ge=0)
    prefix_len: int = Field(default=6, ge=1)
    edit_batch: int = Field(default=16, ge=1)
    max_tokens: int = Field(default=2048, ge=1)


@dataclass(frozen=True)
class Occurrence:
    """A prompt an entry must serve: an edit's prompt or one of its scope prompts."""

    edit: int
    prompt: str
    subject: str | None
    target: str
    label: str


@dataclass
class Codebook:
    """Entries under construction (lists, so GRACE's rule reads as written).

    ``matrix()`` is the keys as one tensor, kept in a buffer that doubles when
    full, so inserting n keys costs O(n) copies rather than O(n²).
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    radius: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    members: list[list[int]] = field(default_factory=list)
    _buffer: torch.Tensor | None = None

    def add(self, key: torch.Tensor, radius: float, label: str, member: int) -> int:
        n = len(self.keys)
        if self._buffer is None or self._buffer.shape[0] == n:
            grown = torch.empty(max(16, 2 * n), key.shape[0], dtype=torch.float32,
                                device=key.device)
            if self._buffer is not None:
                grown[:n] = self._buffer[:n]
            self._buffer = grown
        self._buffer[n] = key.float()
        self.keys.append(key)
        self.radius.append(radius)
        self.labels.append(label)
        self.members.append([member])
        return n

    def matrix(self) -> torch.Tensor:
        """``[n, d]`` float32 keys."""
        if self._buffer is None:
            return torch.zeros(0, 0)
        return self._buffer[: len(self.keys)]


def grace_insert(book: Codebook, key: torch.Tensor, label: str, member: int,
                 init_radius: float) -> str:
    """Insert one key by GRACE's rule; return ``"add"``, ``"split"``, ``"expand"`` or ``"covered"``.

    >>> b = Codebook()
    >>> grace_insert(b, torch.tensor([10.0, 0.0]), "a", 0, 0.1), b.radius
    ('add', [1.0])
    >>> grace_insert(b, torch.tensor([11.5, 0.0]), "a", 1, 0.1), b.radius, b.members
    ('expand', [1.5], [[0, 1]])
    >>> grace_insert(b, torch.tensor([10.0, 2.0]), "b", 2, 0.1), [round(r, 3) for r in b.radius]
    ('split', [1.0, 1.0])
    >>> grace_insert(b, torch.tensor([0.0, 10.0]), "c", 3, 0.1), len(b.keys)
    ('add', 3)
    """
    eps = init_radius * float(key.norm())
    if not book.keys:
        book.add(key, eps, label, member)
        return "add"
    dist = torch.cdist(key[None].float(), book.matrix(),
                       compute_mode="donot_use_mm_for_euclid_dist")[0]
    j = int(dist.argmin())
    d = float(dist[j])
    if d > book.radius[j] + eps:
        book.add(key, eps, label, member)
        return "add"
    if label != book.labels[j]:
        book.add(key, d / 2, label, member)
        book.radius[j] = min(book.radius[j], d / 2 - SPLIT_GAP * d)
        return "split"
    book.members[j].append(member)
    if d > book.radius[j]:
        book.radius[j] = d
        return "expand"
    return "covered"


def exclude(book: Codebook, member_keys: torch.Tensor, negatives: torch.Tensor,
            margin: float, init_radius: float) -> list[tuple[int, float]]:
    """Shrink every ball that holds a negative; re-home members left outside.

    Args:
        book: the codebook (changed in place).
        member_keys: ``[n_occurrences, d]`` keys of the occurrences (members index it).
        negatives: ``[m, d]`` states that must not fire.
        margin: a shrunk radius is ``margin · (distance of the nearest negative)``.
        init_radius: ε for re-homed members, relative to their key's norm.

    Returns:
        ``(entry, nearest negative distance)`` for every entry that shrank.

    >>> b = Codebook(); _ = grace_insert(b, torch.tensor([0.0, 0.0]), "a", 0, 1.0)
    >>> b.radius = [3.0]; b.members = [[0, 1]]
    >>> keys = torch.tensor([[0.0, 0.0], [2.5, 0.0]])
    >>> exclude(b, keys, torch.tensor([[2.0, 0.0]]), 0.9, 0.2)
    [(0, 2.0)]
    >>> [round(r, 2) for r in b.radius], b.members
    ([1.8, 0.45], [[0], [1]])
    """
    if negatives.shape[0] == 0 or not book.keys:
        return []

    def nearest_negative(k: torch.Tensor) -> float:
        return float(torch.cdist(k[None].float(), negatives.float(),
                                 compute_mode="donot_use_mm_for_euclid_dist").min())

    shrunk = []
    for j in range(len(book.keys)):
        dmin = nearest_negative(book.keys[j])
        if dmin <= book.radius[j]:
            book.radius[j] = margin * dmin
            shrunk.append((j, dmin))
            outside = [m for m in book.members[j]
                       if float((member_keys[m] - book.keys[j]).norm()) > book.radius[j]]
            book.members[j] = [m for m in book.members[j] if m not in outside]
            for m in outside:
                k = member_keys[m]
                r = min(init_radius * float(k.norm()), margin * nearest_negative(k))
                book.add(k, r, book.labels[j], m)
    return shrunk


MEMORY_STEPS = 20  # codebook value steps: at most 50, early stop after ~18 measured (lr 1.0)
MEMORY_CONTEXTS = 5  # the bare prompt and 4 seeded prefixes (MemoryParams.n_prefixes)
MEMORY_BATCH_TOKENS = 2048  # padded tokens per value-training batch (MemoryParams.max_tokens)


def _cost(step: Step, facts: ModelFacts, setup: bool) -> Work:
    """``MEMORY_STEPS`` value-training iterations over its prompts, each under
    ``MEMORY_CONTEXTS`` context prefixes."""
    prompts = sum(1 + len(e.scope) for e in step.edits)
    secs = costs.seconds(MEMORY_STEPS * prompts * MEMORY_CONTEXTS * costs.PROMPT_TOKENS
                         * costs.FWD_BWD, costs.model_params(facts))
    batch = min(MEMORY_BATCH_TOKENS, prompts * MEMORY_CONTEXTS * costs.PROMPT_TOKENS)
    return Work(secs, costs.activations_mb(facts, batch), (f"codebook training {secs:.0f} s",))


INFO = BackendInfo(
    name="memory", changes="memory", layers="one", layer_role="rome",
    layer_note="the codebook keys each edit on its subject's last token, as ROME does, so it "
    "sits at ROME's layer rather than GRACE's late one (measured on SmolLM2-135M, 20 "
    "CounterFact edits held out: layer 5 efficacy 1.00, paraphrase 0.93; layer 25 0.60, 0.28)",
    writes_site=None, uses=frozenset({"scope", "preserve", "locality"}), cost=_cost)


class Memory:
    """GRACE-style codebook at one MLP; one MemoryTable per step."""

    name: ClassVar[str] = "memory"
    info: ClassVar[BackendInfo] = INFO
    Params: ClassVar[type[BaseModel]] = MemoryParams

    def default_params(self, facts: ModelFacts) -> MemoryParams:
        return MemoryParams()

    def execute(self, step: Step, ctx: ExecContext) -> Sequence[Payload]:
        p = MemoryParams.model_validate(step.params)
        if len(step.layers) != 1:
            raise BackendError(f"the codebook sits at exactly one layer, the plan gives "
                               f"{list(step.layers)}", step_id=step.id)
        layer = step.layers[0]
        site = ctx.adapter.site("mlp", layer)
        occ = _occurrences(step.edits, p)
        keys, outs = states_at(ctx, site, occ)
        book = Codebook()
        actions: dict[str, int] = {}
        for i, o in enumerate(occ):
            a = grace_insert(book, keys[i], o.label, i, p.init_radius)
            actions[a] = actions.get(a, 0) + 1
        if p.use_preserve:
            self._exclude(book, keys, ctx, site, step.edits, p, step.protect)
        values = train_values(ctx, site, occ, book, outs, p, step.id)
        ctx.log.info("memory %s: %d entries from %d prompts (%s) at %s", step.id, len(book.keys),
                     len(occ), ", ".join(f"{k} {v}" for k, v in sorted(actions.items())), site)
        names = [sorted({step.edits[occ[m].edit].name for m in ms}) for ms in book.members]
        meta = {"kind": "codebook", "key": p.key, "distance": "euclidean", "module": site,
                "labels": list(book.labels), "edits": names,
                "replaces": "the MLP output at positions within the radius of the nearest key"}
        return [MemoryTable(site=site, layer=layer, keys=torch.stack(book.keys).float().cpu(),
                            values=values.cpu(), radius=torch.tensor(book.radius).float(),
                            meta=meta)]

    @staticmethod
    def _exclude(book: Codebook, keys: torch.Tensor, ctx: ExecContext, site: str,
                 edits: Sequence[EditRequest], p: MemoryParams,
                 protect: Sequence[str] = ()) -> None:
        preserve = list(dict.fromkeys([x for e in edits for x in e.preserve] + list(protect)))
        if not preserve:
            return
        negatives = all_states(ctx, site, preserve)
        for j, dmin in exclude(book, keys, negatives, p.margin, p.init_radius):
            level = ctx.log.warning if dmin == 0 else ctx.log.debug
            level("memory: entry for %s shrunk to radius %.4g (a preserve prompt's state is "
                  "%.4g away)%s", book.labels[j], book.radius[j], dmin,
                  "; that prompt shares the key's state and still fires" if dmin == 0 else "")


def _occurrences(edits: Sequence[EditRequest], p: MemoryParams) -> list[Occurrence]:
    out = []
    for i, e in enumerate(edits):
        prompts = (e.prompt, *(e.scope if p.use_scope else ()))
        for prompt in dict.fromkeys(prompts):
            subject = e.subject if p.key == "subject" and e.subject and e.subject in prompt else None
            label = f"subject:{e.subject}" if p.key == "subject" and e.subject else \
                f"target:{e.target_new}"
            out.append(Occurrence(i, prompt, subject, e.target_new, label))
    return out
