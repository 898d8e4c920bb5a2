"""app/worker.py: one thread runs every call, in order, and hands back results and errors."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.worker import ModelThread


def test_every_call_runs_on_one_other_thread():
    worker = ModelThread()
    idents = {worker.run(threading.get_ident) for _ in range(5)}
    assert idents == {worker.ident}
    assert worker.ident != threading.get_ident()
    worker.close()


def test_results_and_exceptions_come_back_to_the_caller():
    worker = ModelThread()
    assert worker.run(torch.add, torch.tensor(2.0), torch.tensor(3.0)).item() == 5.0
    with pytest.raises(ZeroDivisionError):
        worker.run(lambda: 1 / 0)
    assert worker.run(lambda x, *, y: x * y, 6, y=7) == 42  # still alive after an error
    worker.close()


def test_calls_from_many_threads_run_one_at_a_time():
    worker = ModelThread()
    active, peak, lock = [0], [0], threading.Lock()

    def job(i):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        torch.ones(256, 256) @ torch.ones(256, 256)
        with lock:
            active[0] -= 1
        return i

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: worker.run(job, i), range(32)))
    assert results == list(range(32))
    assert peak[0] == 1
    worker.close()
