"""A one-thread executor kept busy until opened: lets tests hold work (e.g. forward passes)
queued behind it, to observe queues, batching and back-pressure deterministically."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager


class Gate:
    """A one-thread executor whose thread stays busy until :meth:`open`."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(1)
        self._event = threading.Event()
        self.executor.submit(self._event.wait)

    def open(self) -> None:
        self._event.set()


@contextmanager
def closed_gate() -> Iterator[Gate]:
    """A :class:`Gate`, opened and shut down on exit (also when the test fails)."""
    g = Gate()
    try:
        yield g
    finally:
        g.open()
        g.executor.shutdown(wait=True)
