"""How many threads torch may use on the CPU: the thread policy.

Contents:
    thread_count()         the number the policy gives (pure: takes the environment)
    apply_thread_policy()  set it once per process (the CLI entry and ``kmec.edit``)

Why: torch starts one OpenMP thread per core. When another CPU-heavy process
shares the cores (a second job, a test run, a CI neighbour), every parallel
region of a small matrix product waits for its slowest thread, and the
slowest one is the one the scheduler just took away: on the 2-core box one
ROME edit took 57 s instead of 4.4 s (issue #17). The δ loop runs many small
products, so it suffers far more than one large forward pass.

The policy, in order:

1. ``KMEC_THREADS=N`` (N ≥ 1) uses N threads; ``KMEC_THREADS=torch`` leaves
   torch's own choice; ``KMEC_THREADS=auto`` takes the cores this process may
   run on (``os.sched_getaffinity``) minus the ones other processes keep busy
   (the 1-minute load average, rounded), at least 1.
2. ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set: the user chose; left alone.
3. Otherwise torch's own choice (one thread per core).

Why ``auto`` is not the default: the thread count changes how CPU reductions
split their sums, so the same spec compiled with one thread and with two gives
weights that differ in the last bits (measured: a ROME edit of the embedded
model, 1 vs 2 threads). A count that follows the load would make a rebuild on
the same machine differ from the first build whenever the box was busier — and
kmec promises the same weights for the same spec, model and version on a CPU.
A fixed count (the default, or ``KMEC_THREADS=N``) keeps that promise; ``auto``
trades it for speed on a shared machine, where idle threads also sleep instead
of spinning (the CLI sets ``OMP_WAIT_POLICY=PASSIVE``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger("kmec")
_applied: list[int] = []  # the count set by apply_thread_policy, once per process


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def thread_count(env: Mapping[str, str], cores: int, load: float) -> int | None:
    """Threads for torch under the policy, or None to leave torch's choice.

    Args:
        env: the environment (``KMEC_THREADS``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``).
        cores: cores this process may run on.
        load: the 1-minute load average (runnable processes, this one not yet among them).

    Raises:
        ValueError: ``KMEC_THREADS`` is neither a positive integer nor ``torch``.

    >>> auto = {"KMEC_THREADS": "auto"}
    >>> thread_count(auto, 2, 0.1), thread_count(auto, 2, 1.2), thread_count(auto, 2, 3.0)
    (2, 1, 1)
    >>> thread_count({"KMEC_THREADS": "3"}, 2, 0.0), thread_count({"OMP_NUM_THREADS": "2"}, 8, 0)
    (3, None)
    >>> thread_count({}, 8, 5.0) is None and thread_count({"KMEC_THREADS": "torch"}, 8, 0) is None
    True
    """
    given = env.get("KMEC_THREADS", "").strip().lower()
    if given == "torch":
        return None
    if given == "auto":
        return max(1, min(cores, cores - round(load)))
    if given:
        if not given.isdigit() or int(given) < 1:
            raise ValueError("KMEC_THREADS must be a positive integer, 'auto' or 'torch', "
                             f"not {given!r}")
        return int(given)
    return None  # the user's OMP/MKL setting, or torch's one thread per core: a fixed count


def apply_thread_policy() -> int:
    """Set torch's thread count by :func:`thread_count` (once per process; later calls
    return the count set first). Returns the threads torch uses.

    Raises:
        ModelError: ``KMEC_THREADS`` is malformed.
    """
    import torch

    from kmec.errors import ModelError

    if _applied:
        return torch.get_num_threads()
    try:
        n = thread_count(os.environ, _cores(), _load())
    except ValueError as e:
        raise ModelError(str(e), hint="e.g. KMEC_THREADS=2, or unset it") from None
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
        log.info("torch threads: %d (cores %d, load %.1f; KMEC_THREADS sets it)", n,
                 _cores(), _load())
    _applied.append(torch.get_num_threads())
    return torch.get_num_threads()
