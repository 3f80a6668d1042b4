"""The one home of forward hooks: ``Trace`` and ``TraceDict``.

Contents:
    StopForward   raised inside a hook to cut the forward pass short
    Trace         context manager on one module: retain input/output, edit
                  the output (optionally seeing the call's arguments), optionally
                  stop the forward pass after it
    TraceDict     the same over several modules at once
    hidden_of()   the hidden states in a module's output (a tensor, or the first of a tuple)
    with_hidden() the output with its hidden states replaced (same structure)
    device_of()   the device a module's (first) parameters live on
    replay_below() run a model from a stored block output: the blocks below are not computed
    get_module()  module by dotted path, with a clear error

Hooks are always removed when the ``with`` block ends, even on error. No other
module in kmec calls ``register_forward_hook``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Self

import torch
from torch import nn

from kmec.errors import ModelError, did_you_mean


class StopForward(Exception):
    """Raised by a hook with ``stop=True``; caught by the ``with`` block."""


def get_module(model: nn.Module, path: str) -> nn.Module:
    """Return the submodule at ``path`` or raise a ModelError naming close paths."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules()]
        raise ModelError(
            f"model has no module {path!r}", hint=did_you_mean(path, names)
        ) from None


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states in a module's output: the output itself, or its first element.

    >>> t = torch.zeros(1); hidden_of((t, None)) is t and hidden_of(t) is t
    True
    """
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced by ``hidden`` (tuple kept a tuple).

    >>> with_hidden((torch.zeros(1), "cache"), torch.ones(1))[1]
    'cache'
    """
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (where its inputs should go); CPU when it
    has none."""
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _first_tensor(x: Any) -> Any:
    return x[0] if isinstance(x, tuple) else x


class Trace:
    """Hook one module for the duration of a ``with`` block.

    Args:
        model: the model that owns the module.
        path: dotted module path.
        retain_input: keep the module's first positional input as ``.input``.
        retain_output: keep the module's output as ``.output``.
        edit_output: ``fn(output, path) -> output`` applied to the output.
        edit_call: ``fn(args, kwargs, output) -> output`` applied to the output
            with the positional and keyword arguments of the call (for edits
            that depend on the whole input, such as a retrieval memory that
            reads ``input_ids`` and ``attention_mask``); after ``edit_output``.
        stop: raise :class:`StopForward` after this module ran (the ``with``
            block swallows it), so layers above are never computed.
        detach: detach retained tensors from the graph.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str,
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        edit_output: Callable[[Any, str], Any] | None = None,
        edit_call: Callable[[tuple[Any, ...], dict[str, Any], Any], Any] | None = None,
        stop: bool = False,
        detach: bool = True,
    ) -> None:
        self.path = path
        self.input: torch.Tensor | None = None
        self.output: Any = None
        module = get_module(model, path)

        def hook(_m: nn.Module, inputs: tuple[Any, ...], *rest: Any) -> Any:
            kwargs, output = rest if len(rest) == 2 else ({}, rest[0])
            if retain_input:
                x = inputs[0] if inputs else None
                self.input = x.detach() if (detach and x is not None) else x
            if edit_output is not None:
                output = edit_output(output, path)
            if edit_call is not None:
                output = edit_call(inputs, kwargs, output)
            if retain_output:
                out = _first_tensor(output)
                self.output = out.detach() if detach else out
            if stop:
                raise StopForward()
            return output

        self._handle = module.register_forward_hook(hook, with_kwargs=edit_call is not None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        self.close()
        return exc_type is StopForward

    def close(self) -> None:
        self._handle.remove()


class TraceDict(dict[str, Trace]):
    """Trace several modules; ``stop=True`` stops after the last one *listed*.

    The caller lists paths in forward order when using ``stop`` (kmec passes
    layers sorted ascending), so the pass ends right after the deepest layer.
    """

    def __init__(
        self,
        model: nn.Module,
        paths: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        edit_output: Callable[[Any, str], Any] | None = None,
        stop: bool = False,
        detach: bool = True,
    ) -> None:
        super().__init__()
        paths = list(dict.fromkeys(paths))
        try:
            for i, p in enumerate(paths):
                self[p] = Trace(
                    model,
                    p,
                    retain_input=retain_input,
                    retain_output=retain_output,
                    edit_output=edit_output,
                    stop=stop and i == len(paths) - 1,
                    detach=detach,
                )
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        self.close()
        return exc_type is StopForward

    def close(self) -> None:
        for t in self.values():
            t.close()


class _Replay(nn.Module):
    """Stands in for a block: returns ``source()`` in the block's output structure.

    Attributes the model reads off its blocks (e.g. ``attention_type`` in models
    with sliding-window layers) are answered by the block it replaces.
    """

    def __init__(self, block: nn.Module, template: Any, source: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)
        self._template, self._source = template, source

    def forward(self, *_args: Any, **_kwargs: Any) -> Any:
        return with_hidden(self._template, self._source())

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


@contextmanager
def replay_below(model: nn.Module, layers_path: str, layer: int, template: Any,
                 source: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Within the block, blocks ``0..layer`` of ``model`` are not computed: each returns
    ``source()`` (a tensor shaped like block ``layer``'s hidden output) in the structure
    of ``template`` (an output of that block), so a forward pass runs the embedding and
    blocks ``layer+1..`` only. The token ids and attention mask passed to the model must
    be those the stored output was computed from (positions and masks of the upper
    blocks come from them). The blocks are put back when the block ends, even on error.

    This is how an optimisation that only changes the residual stream at one layer
    (the target value δ) avoids recomputing the layers below it on every step.
    """
    blocks = get_module(model, layers_path)
    if not isinstance(blocks, nn.ModuleList):
        raise ModelError(f"{layers_path!r} is not a list of blocks")
    saved = [blocks[i] for i in range(layer + 1)]
    try:
        for i, block in enumerate(saved):
            blocks[i] = _Replay(block, template, source)
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block
