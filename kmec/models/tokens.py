"""Where an edit sits in the tokens: the subject's last token, and the target as it follows.

Contents:
    target_text()       the target with the leading space a tokenizer puts after a prompt
    joined_ids()        "prompt target" tokenised as one text, and where the target starts
    subject_position()  the token holding the subject's last character

Both are pure functions of text and a tokenizer, used by the backends, the
causal tracer and the verifier alike (so they live with the models, below
every stage that needs them).
"""

from __future__ import annotations

from typing import Any


def target_text(prompt: str, target: str) -> str:
    """The target as it follows the prompt: with a leading space unless the
    prompt ends in whitespace or the target already starts with one.

    >>> target_text("The capital of France is", "Paris")
    ' Paris'
    >>> target_text("Q: capital? A:", " Paris")
    ' Paris'
    """
    if not prompt or prompt[-1].isspace() or target[:1].isspace():
        return target
    return " " + target


def joined_ids(tok: Any, prompt: str, target: str) -> tuple[list[int], int]:
    """``prompt`` and its target tokenised as one text (as a model reads them), and the
    index of the first token that holds target text: the prompt's own token count, moved
    back when a token merges across the seam.

    >>> class Tok:  # one token per character, except that "s " merges into one
    ...     def encode(self, text, add_special_tokens=False):
    ...         out, i = [], 0
    ...         while i < len(text):
    ...             n = 2 if text[i:i + 2] == "s " else 1
    ...             out.append(text[i:i + n]); i += n
    ...         return out
    >>> joined_ids(Tok(), "ab", "c")
    (['a', 'b', ' ', 'c'], 2)
    >>> joined_ids(Tok(), "is", "c")
    (['i', 's ', 'c'], 1)
    """
    ctx = tok.encode(prompt, add_special_tokens=False)
    full = tok.encode(prompt + target_text(prompt, target), add_special_tokens=False)
    start = len(ctx)
    while start > 0 and full[:start] != ctx[:start]:  # a merge across the seam
        start -= 1
    return list(full), start


def subject_position(tok: Any, text: str, subject: str | None, *, prefix_len: int = 0) -> int:
    """Index of the token holding the last character of ``subject`` in ``text``.

    The subject is searched after ``prefix_len`` characters (so a prefix that
    happens to contain it is skipped). With no subject, the last token.
    """
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = enc["offset_mapping"]
    if subject:
        start = text.find(subject, prefix_len)
        if start < 0:
            start = text.rfind(subject)
        if start >= 0:
            last_char = start + len(subject) - 1
            for i, (a, b) in enumerate(offsets):
                if a <= last_char < b:
                    return i
    return len(offsets) - 1
