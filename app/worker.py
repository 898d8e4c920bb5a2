"""One long-lived thread that runs every torch call of the demo.

Gradio runs each request's handler in a thread of its own pool. If those threads ran the model while
the main thread (which loaded it) keeps its own OpenMP thread team, libgomp manages more threads
than the machine has cores, and its workers stop spinning between parallel regions, so every decode
step pays for waking them. So the demo loads the model on one `ModelThread` and submits every
forward pass to it: one OpenMP team, kept warm from step to step, whichever request asks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class ModelThread:
    """`run(fn, *args)` calls `fn(*args)` on this object's one thread and returns its result (or
    raises its exception) in the caller's thread. Calls from several threads run one at a time,
    in the order they arrive."""

    def __init__(self, name: str = "model"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.ident = self.run(threading.get_ident)  # the thread exists from here on

    def run(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
