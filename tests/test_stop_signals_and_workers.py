"""A job-wide SIGTERM while a DataLoader forks its workers: the workers are forked with the stop signals blocked and
unblock them only after their ``worker_init_fn`` (torch's own worker SIGTERM handler would otherwise end a worker that
got the signal before that function ran)."""

import signal
from functools import partial

import pytest
import torch

from diffusability_hf import errors
from diffusability_hf.data import training

pytestmark = pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks only")

_AT_INIT = {}


def record_mask_then_ignore(worker_id):
    _AT_INIT["blocked"] = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Masks(torch.utils.data.Dataset):
    """Each item: the signals blocked when the worker's init ran, and those blocked now."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        now = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return torch.tensor(_AT_INIT.get("blocked", [-1]) + [-2] + now)


def test_the_mask_is_blocked_only_while_the_first_batch_is_fetched():
    blocked = []

    def batches():
        blocked.append(signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        yield "first"
        blocked.append(signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        yield "second"

    assert list(training._first_batch_without_stop_signals(batches())) == ["first", "second"]
    assert blocked == [True, False] and signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert list(training._first_batch_without_stop_signals([])) == []


def test_workers_start_with_stop_signals_blocked_and_unblock_them_after_their_init():
    loader = torch.utils.data.DataLoader(
        Masks(), batch_size=1, num_workers=1, multiprocessing_context="fork",
        worker_init_fn=partial(training._init_then_unblock_stop_signals, record_mask_then_ignore),
    )  # fmt: skip
    rows = [batch[0].tolist() for batch in training._first_batch_without_stop_signals(loader)]
    stop = {int(signal.SIGTERM), int(signal.SIGINT)}
    for row in rows:
        at_init, now = row[: row.index(-2)], row[row.index(-2) + 1 :]
        assert stop <= set(at_init), at_init  # forked with both blocked
        assert not stop & set(now), now  # unblocked once the init had run


def test_a_fork_waits_until_no_thread_outside_python_runs(monkeypatch):
    """``settle_threads_before_fork``'s wait (CPython gh-112275: a thread that holds the interpreter's thread-list lock
    at a fork leaves the child deadlocked): it looks at the threads that are not Python's, with the GIL released
    between looks, until none runs twice in a row, and gives up after its time limit."""
    import threading

    looks = iter(["R", "R", "S", "R", "S", "S", "R"])
    seen = []

    def state(tid):
        seen.append(int(tid))
        return next(looks)

    def one_native_thread(path):
        return [str(threading.main_thread().native_id), "999999"]  # the main thread is Python's: never looked at

    monkeypatch.setattr(errors, "_thread_state", state)
    monkeypatch.setattr(errors.os, "listdir", one_native_thread)
    errors._wait_for_native_threads(limit_s=60)
    assert seen == [999999] * 6  # R R S R S S: done at the second idle look in a row
    monkeypatch.setattr(errors, "_thread_state", lambda tid: "R")  # a thread that never stops: the limit ends it
    errors._wait_for_native_threads(limit_s=0.05)
