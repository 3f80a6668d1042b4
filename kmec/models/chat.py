"""Prompts asked through a model's chat template (the spec's ``chat on``).

Contents:
    ChatFrame     the text a chat template puts before and after a user's message
    chat_frame()  a tokenizer's frame for one user turn plus the generation prompt
    has_chat_template()  whether a tokenizer carries a chat template

An instruction-tuned model is asked questions as a conversation:
``apply_chat_template([{"role": "user", "content": prompt}],
add_generation_prompt=True)`` renders the prompt inside the template's markers
and ends where the assistant's answer begins, so an edit's target is that
answer. The frame is the template rendered once around a marker and split
there: ``head + prompt + tail`` is the wrapped prompt. Splitting once (rather
than rendering every prompt) keeps the wrapping a pure string function and
tells where the user's text starts, so the subject of an edit is looked for
in the user's text and not in a system message. (A template that trims the
message, as Llama 3's does, would also trim a prompt's outer whitespace;
``head + prompt + tail`` keeps it — prompts are written without it.)

The wrapped text holds the template's special tokens as text
(``<|im_start|>``); Hugging Face tokenizers turn them into their single ids.
A template that opens with the BOS token puts it in ``head``: wrapped prompts
are tokenised without adding special tokens again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kmec.errors import ModelError

_MARK = "\ue000kmec-user-message\ue001"  # private-use characters: no template writes them


@dataclass(frozen=True)
class ChatFrame:
    """What a chat template writes around one user message.

    Attributes:
        head: everything before the message (BOS, system turn, user-turn marker).
        tail: everything after it (end of turn, the assistant's generation prompt).
        system: the system message asked for (None: the template's default).
    """

    head: str
    tail: str
    system: str | None = None

    def wrap(self, prompt: str) -> str:
        """``prompt`` as the user's message; the assistant's answer follows the result.

        >>> ChatFrame("<u>", "</u><a>").wrap("The capital of France is")
        '<u>The capital of France is</u><a>'
        """
        return self.head + prompt + self.tail

    @property
    def user_start(self) -> int:
        """Offset of the user's message in a wrapped prompt (where to look for a subject)."""
        return len(self.head)


def has_chat_template(tok: Any) -> bool:
    """Whether ``tok`` carries a chat template (``tok.chat_template`` is set)."""
    return bool(getattr(tok, "chat_template", None)) and hasattr(tok, "apply_chat_template")


def chat_frame(tok: Any, *, system: str | None = None, model: str = "the model") -> ChatFrame:
    """The frame ``tok``'s chat template puts around one user message.

    Args:
        tok: a Hugging Face tokenizer with a chat template.
        system: a system message placed before the user turn (None: none of our own;
            the template may add its default one).
        model: the model's name, for messages.

    Returns:
        The :class:`ChatFrame`.

    Raises:
        ModelError: the tokenizer has no chat template, the template refuses the
            conversation (some refuse a system message), or it does not write the
            user's message exactly once and unchanged.
    """
    if not has_chat_template(tok):
        raise ModelError(f"{model} has no chat template, so `chat on` cannot wrap its prompts",
                         hint="remove the `chat` setting from the spec (a base model is asked "
                         "plain text), or use an instruction-tuned model whose tokenizer has one")
    messages = [{"role": "user", "content": _MARK}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2 errors raised by the template itself (raise_exception)
        hint = ("remove `system \"...\"` from the `chat` setting: this template takes no "
                "system message" if system is not None else "remove the `chat` setting")
        raise ModelError(f"{model}'s chat template refused a user message: {e}", hint=hint) from e
    if not isinstance(text, str) or text.count(_MARK) != 1:
        raise ModelError(f"{model}'s chat template does not write the user's message once "
                         "and unchanged, so kmec cannot tell where a prompt goes",
                         hint="remove the `chat` setting and write the template's markers "
                         "into the prompts yourself")
    head, tail = text.split(_MARK)
    return ChatFrame(head=head, tail=tail, system=system)


__all__ = ["ChatFrame", "chat_frame", "has_chat_template"]
