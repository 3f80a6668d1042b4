"""The thread policy (kmec.models.threads): KMEC_THREADS (a count, ``auto``: the free cores
by the load average, or ``torch``), else a fixed count (the user's OpenMP/MKL choice or
torch's); applied once per process; a malformed value is a clear error."""

from __future__ import annotations

import pytest
import torch

from kmec.errors import ModelError
from kmec.models import threads


@pytest.mark.parametrize(("env", "cores", "load", "want"), [
    ({}, 2, 0.9, None),  # by default a fixed count whatever the load: same weights
    ({"KMEC_THREADS": "auto"}, 2, 0.0, 2),  # a quiet box: every core
    ({"KMEC_THREADS": "auto"}, 2, 0.9, 1),  # another CPU-heavy process: the core it leaves
    ({"KMEC_THREADS": "auto"}, 2, 5.0, 1),  # never fewer than one
    ({"KMEC_THREADS": "Auto"}, 16, 3.2, 13),
    ({"KMEC_THREADS": "4"}, 2, 5.0, 4),  # the user's word wins
    ({"KMEC_THREADS": " torch "}, 2, 0.0, None),
    ({"OMP_NUM_THREADS": "3"}, 2, 0.0, None),
    ({"MKL_NUM_THREADS": "1"}, 8, 0.0, None),
])
def test_thread_count(env, cores, load, want):
    assert threads.thread_count(env, cores, load) == want


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_a_malformed_setting_is_refused(bad):
    with pytest.raises(ValueError, match="KMEC_THREADS"):
        threads.thread_count({"KMEC_THREADS": bad}, 2, 0.0)


@pytest.fixture
def fresh(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_applied", [])
    yield
    torch.set_num_threads(before)


def test_applied_once_per_process(fresh, monkeypatch):
    monkeypatch.setenv("KMEC_THREADS", "1")
    assert threads.apply_thread_policy() == 1 == torch.get_num_threads()
    monkeypatch.setenv("KMEC_THREADS", "2")
    assert threads.apply_thread_policy() == 1  # set once: a second command does not move it


def test_a_malformed_setting_is_a_model_error(fresh, monkeypatch):
    monkeypatch.setenv("KMEC_THREADS", "many")
    with pytest.raises(ModelError, match="KMEC_THREADS") as e:
        threads.apply_thread_policy()
    assert e.value.hint
