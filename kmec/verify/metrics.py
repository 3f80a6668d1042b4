"""Edit-quality metrics, each stated as the formula it implements.

Contents:
    PROTOCOLS          the scoring protocols a claim may name
    probe_value()      one probe's success in [0, 1] under a protocol
    magnitude()        CounterFact's magnitude: P(new) − P(old)
    accuracy()         survey eq. 3 (efficacy / edit success)
    generality()       survey eq. 8–9
    portability()      survey eq. 10–11
    reversal()         portability restricted to the reverse question
    agrees()           base and edited model agree on a prompt (locality test)
    locality()         survey eq. 4–7
    retention()        survey eq. 12 (retainability, sequential editing)
    relative_retention()
    scalability()      survey eq. 13
    relative_scalability()  survey eq. 14
    kl_divergence()    KL(P ‖ Q) of two next-token distributions
    perplexity_ratio() edited / base perplexity (general-capability canary)

Notation: f is the base model, f' the edited one, x_e an edit prompt and y_e
its new target. "Survey" is Wang et al., *Knowledge Editing for Large Language
Models: A Survey* (ACM Computing Surveys, 2024; arXiv:2310.16218); the
formulas below restate its definitions in our own words, with the survey's
abstract "f'(x) = y" made concrete by a scoring protocol:

* ``prob`` — probability comparison (CounterFact, Meng et al. 2022). With an
  old target: success iff the mean per-token log-probability of the new
  target exceeds the old target's (length-normalised, as ROME's evaluation
  compares mean token NLLs). Without an old target: success iff the new
  target's first token is the model's top-1 next token, i.e. P(new's first
  token) exceeds the probability of every other single next token.
* ``token`` — teacher-forced token accuracy (EasyEdit): the fraction of the
  target's tokens that are the arg-max given the prompt and the target tokens
  before them. A fractional score in [0, 1].
* ``greedy`` — greedy exact match: 1 iff greedy decoding after the prompt
  starts with the target's tokens. This equals "every target token is the
  teacher-forced arg-max" (greedy decoding emits token i iff it is the
  arg-max given the tokens before it), so it is computed in one forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from kmec.verify.scoring import ItemScore

Protocol = Literal["prob", "token", "greedy"]
PROTOCOLS: tuple[str, ...] = ("prob", "token", "greedy")


def probe_value(new: ItemScore, old: ItemScore | None = None, protocol: str = "prob") -> float:
    """One probe's success under ``protocol`` (see the module docstring).

    Args:
        new: the model's score of the new (expected) target after the prompt.
        old: its score of the old target after the same prompt, if declared.
        protocol: ``prob``, ``token`` or ``greedy``.

    Returns:
        1.0 / 0.0 for ``prob`` and ``greedy``; the token accuracy for ``token``.
    """
    if protocol == "prob":
        if old is not None:
            return 1.0 if new.mean_logprob > old.mean_logprob else 0.0
        return 1.0 if new.target_ids and new.top1 == new.target_ids[0] else 0.0
    if protocol == "token":
        return new.token_accuracy
    if protocol == "greedy":
        return 1.0 if new.exact else 0.0
    raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")


def magnitude(new: ItemScore, old: ItemScore | None = None) -> float:
    """CounterFact's magnitude: P(new) − P(old), or P(new) without an old target.

    P(t) is exp(mean token log-probability of t), the per-token probability.
    """
    return new.prob - (old.prob if old is not None else 0.0)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def accuracy(values: Sequence[float]) -> float:
    """Survey eq. 3 (accuracy, called efficacy or edit success).

    Acc = (1/|E|) · Σ_{(x_e, y_e) ∈ E} 1[f'(x_e) = y_e]: over the edit
    statements, the mean success of the edited model on its own edit prompt.
    ``values`` are per-probe successes from :func:`probe_value`.
    """
    return _mean(values)


def generality(values: Sequence[float]) -> float:
    """Survey eq. 8–9 (generality).

    With I(x_e) the in-scope inputs of an edit (paraphrases of its prompt),
    Gen = E_{x ∈ I(x_e)} 1[f'(x) = y_e]: the mean success on in-scope prompts.
    """
    return _mean(values)


def portability(values: Sequence[float]) -> float:
    """Survey eq. 10–11 (portability).

    With P(x_e) the questions whose answer follows from the edit (multi-hop,
    aliases, related facts), each with its own answer y,
    Port = E_{(x, y) ∈ P(x_e)} 1[f'(x) = y].
    """
    return _mean(values)


def reversal(values: Sequence[float]) -> float:
    """Reversal (bidirectionality), the survey's "reversed relation" case of
    portability (eq. 10–11): for an edit (s, r, o → o*), the reverse question
    r⁻¹(o*) must be answered with s: Rev = E 1[f'(r⁻¹(o*)) = s].
    """
    return _mean(values)


def agrees(base: ItemScore, edited: ItemScore, kl_budget: float | None = None) -> bool:
    """Whether the edited model still behaves like the base on a prompt.

    True iff the top-1 next token is unchanged and, when a budget is given,
    KL(P_f(·|x) ‖ P_f'(·|x)) ≤ budget (``edited.kl`` holds that divergence).
    """
    if base.top1 != edited.top1:
        return False
    return kl_budget is None or edited.kl <= kl_budget


def locality(agreements: Sequence[bool]) -> float:
    """Survey eq. 4–7 (locality).

    With O(x_e) the inputs outside the edit's scope,
    Loc = E_{x ∈ O(x_e)} 1[f'(x) = f(x)]: the fraction of out-of-scope prompts
    on which the edited model agrees with the base (see :func:`agrees`).
    """
    return _mean([1.0 if a else 0.0 for a in agreements])


def retention(after_all: Sequence[float]) -> float:
    """Survey eq. 12 (retainability), for edits applied in sequence.

    For K edits applied one after another, Ret = (1/(K−1)) · Σ_{k<K}
    1[f'_K(x_k) = y_k]: the mean success of every edit but the last on the
    model after *all K* edits (f'_K), i.e. whether later edits wiped out
    earlier ones. ``after_all`` are those successes.
    """
    return _mean(after_all)


def relative_retention(after_all: Sequence[float], at_own_step: Sequence[float]) -> float | None:
    """Retention relative to each edit's success right after its own step:
    Σ_k success_k(f'_K) / Σ_k success_k(f'_k); None when no edit ever held.
    """
    denom = sum(at_own_step)
    return sum(after_all) / denom if denom else None


def scalability(batch_values: Sequence[float]) -> float:
    """Survey eq. 13 (scalability).

    Sca = E_{D ∼ batches} E_{(x_e, y_e) ∈ D} 1[f'_D(x_e) = y_e]: the mean
    success of each edit on the model edited with its whole batch D at once.
    """
    return _mean(batch_values)


def relative_scalability(batch_values: Sequence[float],
                         single_values: Sequence[float]) -> float | None:
    """Survey eq. 14 (relative scalability).

    Sca_rel = Sca / Acc_single: batch success (eq. 13) divided by the mean
    success of the same edits each applied alone; 1 means batching costs
    nothing. None when the single edits never succeed (undefined ratio).
    """
    single = _mean(single_values)
    return scalability(batch_values) / single if single else None


def kl_divergence(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> float:
    """KL(P ‖ Q) = Σ_v P(v) · (log P(v) − log Q(v)), in nats, from log-probabilities.

    >>> import torch
    >>> p = torch.tensor([0.5, 0.5]).log(); q = torch.tensor([0.25, 0.75]).log()
    >>> round(kl_divergence(p, q), 6)
    0.143841
    """
    p = p_logprobs.double()
    return max(float((p.exp() * (p - q_logprobs.double())).sum()), 0.0)


def perplexity_ratio(base: float, edited: float) -> float:
    """PPL_f' / PPL_f; above 1 means the edit made ordinary text less likely.

    PPL = exp(−(1/N) Σ_t log P(w_t | w_<t)) over the corpus slice's tokens.
    """
    return edited / base if base > 0 and math.isfinite(base) else float("inf")
