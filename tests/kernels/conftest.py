"""Run Triton kernels on the CPU: TRITON_INTERPRET=1 must be set before a kernel is defined.

triton reads the variable when ``@triton.jit`` decorates a function, so this
conftest sets it at import (before any test module imports kmec.kernels.xtx),
and the ``xtx_interp`` fixture re-imports the kernel module if something
imported it earlier without the interpreter.
"""

from __future__ import annotations

import importlib
import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def xtx_interp():
    """kmec.kernels.xtx with its kernel running in Triton's interpreter."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from kmec.kernels import xtx

    if not isinstance(xtx._xtx_kernel, InterpretedFunction):
        xtx = importlib.reload(xtx)
    assert isinstance(xtx._xtx_kernel, InterpretedFunction)
    return xtx
