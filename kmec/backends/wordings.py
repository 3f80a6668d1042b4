"""Wordings the compiler draws from the model for an edit that declares none.

An edit that declares only its prompt teaches the target value δ one wording of
its question. Measured on CounterFact records 50..99 (development records; the
peer table scores 0..49), δ reached ≈ 95 % of its strength at the subject in a
paraphrase (the key is retrieved), yet adding δ there by hand made the new
object the paraphrase's next token only as often as the edit did (0.55): what
fails is not the key but a δ fitted to one relation wording ("The native
language of X is" learns little for "X spoke the language"). So the compiler
asks the model itself for other wordings, as it already asks it for the context
prefixes (:func:`~kmec.backends.keys.context_prefixes`):

1. The prompt's template (the subject replaced by ``X``) follows a few-shot
   header of unrelated rewordings, and ``samples`` continuations are drawn
   (top-k 20, a seeded ``torch.Generator``, at most ``max_tokens`` tokens, up to
   the line's end).
2. A candidate must hold ``X`` exactly once, differ from the template and from
   the header's own phrases (a copied shot such as "The colour of X is" is not a
   wording of the edit), and not open with a one-token subject (its key would
   sit on the first position, the attention sink: see
   :func:`~kmec.backends.keys.key_opening_scopes`).
3. With the subject put back, a candidate is kept when the unedited model does
   not rule the edit's answer out after it: the mean per-token log-probability
   of the edit's objects (new, and old when declared) within ``margin`` (5)
   nats of theirs after the edit's own prompt. The first ``keep`` kept, in the
   order drawn, are used.

Why not the best-scoring ones: a wording after which the object is the most
natural next token teaches δ little the prompt does not. The wordings that
generalise are those where the object competes with the grammar ("X spoke the
language" → " of"), and a tight filter ranked by that score kept exactly the
easy ones. On development records 50..99 (token accuracy on the first
paraphrase, ROME, 3 wordings) the best 3 within 2 nats gave 0.62; the first 3
in draw order within 5 nats, copied shots dropped, 0.67 (within no margin at
all, 0.69; the margin stays as a guard against wordings that change the
question). On records 200..299, which no choice saw, the change raised it from
0.57 to 0.625 (paired +0.055 ± 0.038) at the same locality (BENCHMARKS.md).

They join the edit as *borrowed* wordings (:attr:`EditRequest.borrowed
<kmec.planner.model.EditRequest>`): one more row per prefix in δ's objective
with ``borrowed_weight`` of it, and keys of the rank-one fit. They are not
declared and not part of the plan; the plan holds ``value.wordings`` (how
many), ``compile.log`` lists every one drawn (``INFO``), and the same model,
plan and machine draw the same texts (cached under ``<cache>/wordings``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kmec._version import __version__
from kmec.hashing import atomic_write_text, canonical_json, sha256_text
from kmec.models.batching import right_pad
from kmec.models.hooks import device_of
from kmec.models.prefix_kv import cache_kwarg
from kmec.models.tokens import joined_ids, subject_position
from kmec.planner.model import EditRequest

# Rewordings of relations no benchmark here asks about, written for this header.
SHOTS = (
    "Each line says the same thing in other words.\n"
    "The capital city of X is => X has its seat of government in\n"
    "The CEO of X is => X is run by\n"
    "The author of X is => X was written by\n"
    "X is made of => the material of X is\n"
    "The colour of X is => X is painted in\n"
)
PLACEHOLDER = "X"
# the header's own phrases: a continuation that only copies one is not a wording of the edit
_SHOT_SIDES = frozenset(side.strip() for line in SHOTS.splitlines()[1:]
                        for side in line.split("=>"))
SAMPLES = 8
MAX_TOKENS = 12
MARGIN = 5.0  # nats (mean per target token) below the edit prompt's own
TOP_K = 20
_ALONE = re.compile(rf"(?<![A-Za-z0-9]){PLACEHOLDER}(?![A-Za-z0-9])")  # X as a word, not in "Xbox"
VERSION = 3  # bump when the drawing or the filter changes: cached texts and steps go stale

log = logging.getLogger("kmec")


def per_edit(params: Mapping[str, Any]) -> int:
    """How many wordings a step whose (dumped) backend ``params`` are given draws for each
    eligible edit: ``value.wordings``, 0 where the step has none.

    >>> per_edit({"value": {"wordings": 3}}), per_edit({"value": {}}), per_edit({})
    (3, 0, 0)
    """
    value = params.get("value")
    return int(value.get("wordings", 0)) if isinstance(value, Mapping) else 0


def eligible(edit: EditRequest) -> bool:
    """Whether wordings are drawn for ``edit``: it has a subject, declares no scope
    prompt, borrows none, and is not the inverse edit of a reversal claim."""
    return bool(edit.subject) and not (edit.scope or edit.borrowed or edit.inverse)


def template_of(edit: EditRequest) -> str | None:
    """The edit's prompt with its subject as ``X``; None when no template can be made
    (no subject, the subject not in the prompt, or ``X`` already in it).

    >>> template_of(EditRequest(name="e", prompt="The mother tongue of Ann Li is",
    ...                         subject="Ann Li", target_new="Dutch"))
    'The mother tongue of X is'
    >>> template_of(EditRequest(name="e", prompt="Malcolm X was born in", subject="Malcolm X",
    ...                         target_new="Omaha")) is None
    True
    """
    s = edit.subject
    if not s or s not in edit.prompt or PLACEHOLDER in edit.prompt.replace(s, ""):
        return None
    head, _, tail = edit.prompt.rpartition(s)
    if PLACEHOLDER in s or not (head + tail).strip():
        return None
    return f"{head}{PLACEHOLDER}{tail}"


def candidates(texts: Sequence[str], template: str, subject: str, tok: Any) -> list[str]:
    """The drawn ``texts`` that may serve as wordings, with the subject put back, in
    order and without repeats (rule 2 of the module docstring).

    >>> class Tok:  # one token per word
    ...     def __call__(self, text, **_):
    ...         starts = [i for i, c in enumerate(text) if c != " " and (i == 0 or text[i - 1] == " ")]
    ...         return {"offset_mapping": [(a, text.find(" ", a) % (len(text) + 1)) for a in starts]}
    >>> candidates([" X is spoken in\\nmore", "X is spoken in", "the X of X", "the tongue of X",
    ...             "The mother tongue of X is", "nothing"], "The mother tongue of X is", "Ann", Tok())
    ['the tongue of Ann']
    >>> candidates(["X is spoken in", "an Xbox of"], "The mother tongue of X is", "Ann Li", Tok())
    ['Ann Li is spoken in']
    """
    out: list[str] = []
    for raw in texts:
        w = raw.split("\n")[0].strip()
        if w.count(PLACEHOLDER) != 1 or not _ALONE.search(w) or w == template \
                or len(w) <= len(PLACEHOLDER) + 2 or w in _SHOT_SIDES:
            continue
        text = w.replace(PLACEHOLDER, subject)
        if text.startswith(subject) and subject_position(tok, text, subject) == 0:
            continue
        if text not in out:
            out.append(text)
    return out


def _cache_of(out: Any) -> Any:
    """The key/value cache a forward returned (``cache`` in recent transformers releases,
    ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out["past_key_values"]


@torch.no_grad()
def draw(model: Any, tok: Any, template: str, *, samples: int, seed: int,
         max_tokens: int = MAX_TOKENS) -> list[str]:
    """``samples`` continuations of the few-shot header and ``template`` (top-k
    sampling with a seeded generator, all rows in one batch with a key/value cache
    filled once from the shared prompt), each cut at its first line break."""
    device = device_of(model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompt = tok.encode(SHOTS + template + " =>", add_special_tokens=False)
    kwarg = cache_kwarg(model)
    # the shared prompt runs once; its cache and logits are repeated for every sample
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    past = _cache_of(out)
    past.batch_repeat_interleave(samples)
    logits = out.logits[:, -1].expand(samples, -1)
    drawn: list[list[int]] = [[] for _ in range(samples)]
    open_rows = torch.ones(samples, dtype=torch.bool)
    for _ in range(max_tokens):
        top = torch.topk(logits.float().cpu(), TOP_K, dim=-1)
        pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)[:, 0]
        nxt = top.indices.gather(1, pick[:, None])[:, 0]
        for r in range(samples):
            if open_rows[r]:
                drawn[r].append(int(nxt[r]))
                if "\n" in tok.decode([int(nxt[r])]):
                    open_rows[r] = False
        if not bool(open_rows.any()):
            break
        out = model(input_ids=nxt[:, None].to(device), use_cache=True, **{kwarg: past})
        past, logits = _cache_of(out), out.logits[:, -1]
    return [tok.decode(d, skip_special_tokens=True) for d in drawn]


@torch.no_grad()
def answer_logprob(model: Any, tok: Any, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """Mean per-token log-probability of each target after its prompt (one batch)."""
    rows, spans = [], []
    for prompt, target in pairs:
        full, start = joined_ids(tok, prompt, target)
        rows.append(full)
        spans.append((max(start, 1), len(full)))
    ids, mask = right_pad(rows, tok.pad_token_id or 0, device_of(model))
    logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    out = []
    for r, (a, b) in enumerate(spans):
        pos = torch.arange(a - 1, b - 1, device=logp.device)
        out.append(float(logp[r, pos, ids[r, a:b]].mean()) if b > a else float("-inf"))
    return out


def select(model: Any, tok: Any, edit: EditRequest, texts: Sequence[str], *, keep: int,
           margin: float = MARGIN) -> list[str]:
    """The first ``keep`` of ``texts``, in the order drawn, whose answers score within
    ``margin`` of the prompt's (rule 3 of the module docstring)."""
    if not texts or keep <= 0:
        return []
    objects = [edit.target_new] + ([edit.target_old] if edit.target_old else [])
    prompts = [edit.prompt, *texts]
    lp = answer_logprob(model, tok, [(p, o) for p in prompts for o in objects])
    k = len(objects)
    score = [sum(lp[i * k:(i + 1) * k]) / k for i in range(len(prompts))]
    return [t for t, s in zip(texts, score[1:]) if s >= score[0] - margin][:keep]


def generate(model: Any, tok: Any, edit: EditRequest, *, keep: int, seed: int,
             cache_dir: Path | None = None, weights: str = "",
             samples: int = SAMPLES) -> tuple[str, ...]:
    """Up to ``keep`` wordings of ``edit``'s question drawn from ``model`` (module
    docstring); () when its prompt has no template. Cached on disk under
    ``cache_dir/wordings`` by ``weights`` (what the model holds, as
    :attr:`~kmec.backends.base.ExecContext.weights`; "" turns the cache off), its
    device and dtype, the edit and the settings."""
    template = template_of(edit)
    if template is None or keep <= 0:
        return ()
    path = None
    if cache_dir is not None and weights:
        p = next(model.parameters())
        key = sha256_text(canonical_json({
            "kmec": __version__, "v": VERSION, "weights": weights, "device": p.device.type,
            "dtype": str(p.dtype), "edit": [edit.prompt, edit.subject, edit.target_new,
                                            edit.target_old], "keep": keep, "seed": seed,
            "samples": samples}))
        path = Path(cache_dir) / "wordings" / f"{key}.json"
        try:
            cached = json.loads(path.read_text())
            if isinstance(cached, list) and all(isinstance(t, str) for t in cached):
                return tuple(cached)
        except (OSError, json.JSONDecodeError):
            pass
    assert edit.subject is not None  # template_of checked it
    texts = candidates(draw(model, tok, template, samples=samples, seed=seed), template,
                       edit.subject, tok)
    kept = tuple(select(model, tok, edit, texts, keep=keep))
    if path is not None:
        atomic_write_text(path, json.dumps(list(kept)))
    return kept


def with_wordings(model: Any, tok: Any, edits: Sequence[EditRequest], *, keep: int, seed: int,
                  cache_dir: Path | None = None, weights: str = "",
                  logger: logging.Logger = log) -> list[EditRequest]:
    """``edits`` with drawn wordings added (as scope, marked borrowed) to each edit that
    has neither declared scope prompts nor borrowed wordings and is not the inverse edit
    of a reversal claim; the others unchanged. Every edit draws with the same ``seed``
    (its own template makes its draw its own), so an edit draws the same wordings
    wherever it stands in a step."""
    if keep <= 0:
        return list(edits)
    out = []
    for e in edits:
        if not eligible(e):
            out.append(e)
            continue
        drawn = generate(model, tok, e, keep=keep, seed=seed, cache_dir=cache_dir,
                         weights=weights)
        if drawn:
            logger.info("%s: %d wording(s) drawn from the model: %s", e.name, len(drawn),
                        "; ".join(repr(t) for t in drawn))
            e = e.model_copy(update={"scope": drawn, "borrowed": drawn})
        out.append(e)
    return out
