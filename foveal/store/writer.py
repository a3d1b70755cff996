"""Batched, off-the-request-path writes of decision records."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError

from foveal import metrics
from foveal.errors import Conflict, RateLimited
from foveal.store.records import DecisionRecord
from foveal.store.store import Store

__all__ = ["DecisionWriter"]

log = logging.getLogger(__name__)

# A row refused for what it is (a reused request id, a value the column or JSON cannot hold):
# retrying cannot help, so it is dropped, logged and counted rather than wedging the writer.
_BAD_ROW_ERRORS = (Conflict, IntegrityError, DataError, TypeError, ValueError)


def _is_bad_row(exc: BaseException) -> bool:
    if isinstance(exc, _BAD_ROW_ERRORS):
        return True
    # Failed while preparing parameters, before reaching the database (e.g. not JSON-able).
    return isinstance(exc, StatementError) and not isinstance(exc, DBAPIError)


_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 10.0


class DecisionWriter:
    """Batches decision writes off the request path. A crash loses at most what
    STORE_DECISIONS_PENDING reports.

    ``submit`` and ``pending`` are called from the event loop's thread; the database work
    runs in a worker thread so the loop never waits on it.
    """

    def __init__(
        self,
        store: Store,
        *,
        interval_s: float = 0.05,
        batch_max: int = 256,
        queue_max: int = 100_000,
    ) -> None:
        self._store = store
        self._interval_s = interval_s
        self._batch_max = batch_max
        self._queue_max = queue_max
        self._queue: deque[DecisionRecord] = deque()  # FIFO; the in-flight batch stays at the head
        self._by_id: dict[str, DecisionRecord] = {}
        self._submitted = 0  # records ever submitted
        self._resolved = 0  # records committed or dropped, in submission order
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._work = asyncio.Event()  # set while records wait
        self._hurry = asyncio.Event()  # write now: a flush waits, or a full batch is ready
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def backlog(self) -> int:
        """Records submitted but not yet committed (or dropped)."""
        return len(self._queue)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="foveal-decision-writer"
            )

    def submit(self, record: DecisionRecord) -> None:
        """Queue ``record``; raises RateLimited when ``queue_max`` records are already waiting.

        After ``close`` the record is logged as lost instead (requests may outlive the writer).
        """
        if self._closing:
            log.error(
                "decision of %s lost: the writer is closed",
                record.request_id,
                extra={"request_id": record.request_id, "tenant": record.tenant},
            )
            return
        if len(self._queue) >= self._queue_max:
            raise RateLimited(
                f"the decision store is behind ({len(self._queue)} decisions waiting)",
                code="store_backlog",
                retry_after_s=1.0,
            )
        self._queue.append(record)
        self._by_id[record.request_id] = record
        self._submitted += 1
        metrics.STORE_DECISIONS_PENDING.set(len(self._queue))
        self._work.set()
        if len(self._queue) >= self._batch_max:
            self._hurry.set()

    def pending(self, request_id: str) -> DecisionRecord | None:
        """The record submitted for ``request_id`` if it is not committed yet."""
        return self._by_id.get(request_id)

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed; raises if a write fails first."""
        if self._resolved >= self._submitted:
            return
        if self._task is None or self._task.done():
            raise RuntimeError("the decision writer is not running (call start())")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._submitted, fut))
        self._hurry.set()
        await fut

    async def close(self) -> None:
        """Flush and stop. Whatever the final write could not commit is lost, and logged."""
        if self._task is None:
            self._closing = True
            if self._queue:
                log.error("%d decisions lost: the writer was never started", len(self._queue))
            return
        while True:
            try:
                await self.flush()
            except Exception as exc:
                if _is_bad_row(exc):
                    continue  # that row is dropped and logged; flush the rest
                log.error(
                    "%d decisions lost at shutdown: the final write failed: %s",
                    len(self._queue),
                    exc,
                )
            break
        self._closing = True
        task, self._task = self._task, None
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # close() itself was cancelled
        except Exception:
            log.exception("the decision writer had stopped on an unexpected error")

    # ---- the worker --------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._work.wait()
            delay = self._interval_s if failures == 0 else _backoff(failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), delay)  # gather a batch, or back off
            self._hurry.clear()
            while self._queue:
                if not await self._write_batch():
                    failures += 1
                    break
                failures = 0
            if not self._queue:
                self._work.clear()

    async def _write_batch(self) -> bool:
        """Write the head of the queue; False (records kept) when the database failed."""
        batch = [self._queue[i] for i in range(min(self._batch_max, len(self._queue)))]
        try:
            await asyncio.to_thread(self._store.add_decisions, batch)
        except Exception as exc:
            if not _is_bad_row(exc):
                return self._failed(exc, len(batch))
            log.warning("batch of %d decisions refused (%s); writing row by row", len(batch), exc)
            return await self._write_rows(batch)
        self._committed(len(batch))
        return True

    async def _write_rows(self, batch: list[DecisionRecord]) -> bool:
        for record in batch:
            try:
                await asyncio.to_thread(self._store.add_decisions, [record])
            except Exception as exc:
                if not _is_bad_row(exc):
                    return self._failed(exc, len(self._queue))
                metrics.STORE_WRITE_ERRORS_TOTAL.inc()
                log.error(
                    "decision of %s dropped: the store refuses it: %s",
                    record.request_id,
                    exc,
                    extra={"request_id": record.request_id, "tenant": record.tenant},
                )
                self._pop(1)
                self._resolve(error=exc, first_failed=self._resolved)
                continue
            self._committed(1)
        return True

    def _committed(self, n: int) -> None:
        self._pop(n)
        metrics.STORE_DECISIONS_WRITTEN_TOTAL.inc(n)
        self._resolve()

    def _failed(self, exc: Exception, n: int) -> bool:
        metrics.STORE_WRITE_ERRORS_TOTAL.inc()
        log.error("writing %d decisions failed (kept, will retry): %s", n, exc)
        self._resolve(error=exc, first_failed=self._resolved + 1)
        return False

    def _pop(self, n: int) -> None:
        for _ in range(n):
            record = self._queue.popleft()
            if self._by_id.get(record.request_id) is record:
                del self._by_id[record.request_id]
        self._resolved += n
        metrics.STORE_DECISIONS_PENDING.set(len(self._queue))

    def _resolve(self, *, error: BaseException | None = None, first_failed: int = 0) -> None:
        """Wake the flushes that are done: met (result) or covering a failed record (error)."""
        keep: list[tuple[int, asyncio.Future[None]]] = []
        for target, fut in self._waiters:
            if fut.done():
                continue
            if error is not None and target >= first_failed:
                fut.set_exception(error)
            elif target <= self._resolved:
                fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep


def _backoff(failures: int) -> float:
    return float(min(_BACKOFF_MAX_S, _BACKOFF_MIN_S * 2 ** (failures - 1)))
