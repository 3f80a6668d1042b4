"""Whole-text computations: perplexity of a text and greedy continuations.

Contents:
    perplexity()            per-model perplexity of texts (a general-capability canary)
    greedy_continuations()  the text each model writes greedily after each prompt

Both batch over texts; perplexity reuses the per-item scorer (every token of a
text after the first is a target token), greedy decoding uses the model's
``generate`` on a left-padded batch (so every row's last real token is last).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from kmec.errors import VerifyError
from kmec.models.chat import ChatFrame
from kmec.models.hooks import device_of
from kmec.verify.scoring import Encoded, _ids, pad_id_of, score_encoded


def perplexity(models: Sequence[Any], tok: Any, texts: Sequence[str], *, max_len: int = 128,
               max_batch_tokens: int = 2048) -> tuple[float, ...]:
    """Perplexity of each model on ``texts``: exp(−mean log P(token | tokens before)).

    Each text is cut to ``max_len`` tokens; every token after the first is scored.
    """
    encoded = []
    for t in texts:
        ids = _ids(tok, t)[:max_len]
        if len(ids) >= 2:
            encoded.append(Encoded(tuple(ids), 1))
    if not encoded:
        raise VerifyError("the perplexity corpus slice has no text to score")
    scores = score_encoded(models, encoded, pad_id=pad_id_of(tok), max_batch_tokens=max_batch_tokens)
    out = []
    for m in range(len(models)):
        lps = [lp for row in scores for lp in row[m].target_logprobs]
        out.append(math.exp(-sum(lps) / len(lps)))
    return tuple(out)


def greedy_continuations(models: Sequence[Any], tok: Any, prompts: Sequence[str], *,
                         max_new_tokens: int = 8,
                         chat: ChatFrame | None = None) -> list[tuple[str, ...]]:
    """The text each model writes greedily after each prompt (left-padded batch).

    With ``chat`` each prompt is asked as a user turn of the model's chat template.

    Returns:
        One tuple per prompt, one continuation per model.
    """
    if not prompts:
        return []
    pad = pad_id_of(tok)
    enc = [_ids(tok, p) if chat is None else _ids(tok, chat.wrap(p), False) for p in prompts]
    width = max(len(e) for e in enc)
    per_model = []
    for model in models:
        dev = device_of(model)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=dev)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=dev)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=pad,
                                 temperature=None, top_p=None, top_k=None)
        per_model.append([tok.decode(row[width:].tolist(), skip_special_tokens=True) for row in out])
    return [tuple(texts) for texts in zip(*per_model)]
