"""Backend registry: an explicit dict from name to backend instance.

Contents:
    BACKENDS       name -> backend
    get_backend()  lookup with a did-you-mean error
"""

from __future__ import annotations

from kmec.backends.alphaedit import AlphaEdit
from kmec.backends.base import Backend
from kmec.backends.finetune import Finetune
from kmec.backends.memit import Memit
from kmec.backends.memory import Memory
from kmec.backends.mend import Mend
from kmec.backends.retrieval import Retrieval
from kmec.backends.rome import Rome
from kmec.errors import PlanError, did_you_mean

BACKENDS: dict[str, Backend] = {b.name: b for b in (Rome(), Memit(), AlphaEdit(), Finetune(),
                                                     Mend(), Memory(), Retrieval())}


def get_backend(name: str, registry: dict[str, Backend] | None = None) -> Backend:
    """Return the backend called ``name``.

    Raises:
        PlanError: no such backend; the message lists the known ones.
    """
    reg = BACKENDS if registry is None else registry
    try:
        return reg[name]
    except KeyError:
        known = ", ".join(sorted(reg)) or "none"
        raise PlanError(f"unknown backend {name!r} (known: {known})",
                        hint=did_you_mean(name, reg)) from None
