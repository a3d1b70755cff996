"""Dynamic batching in front of the reference VLM: one batched forward for many requests.

Requests wait in a bounded queue. A worker task takes the waiting requests (up to
``max_batch``) and runs ONE ``ReferenceVLM.generate`` over all of them in an executor thread,
so torch never blocks the event loop. While a batch runs, new requests queue up and form the
next batch: under load the batches fill themselves. When the last batch held more than one
request (concurrent clients), the first request of the next batch also waits up to
``batch_wait_ms`` for company, which catches clients that resend a moment after their answer;
a lone client never pays that wait.

A batch mixes requests with different ``max_tokens``: it is generated with the largest and each
answer is cut to its own limit afterwards (greedy decoding is per row, so a cut answer is the
one a solo run would give). ``finish_reason`` is ``stop`` when the end-of-sequence token (or a
stop string) came within the request's limit, else ``length``.

A full queue refuses at once (:class:`QueueFull`, HTTP 429 with ``Retry-After``); a draining or
closed engine refuses with :class:`NotAccepting` (HTTP 503). :meth:`PoolEngine.drain` stops
accepting and returns once every queued and running request has its answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from foveal.pools.reference.compress import MECHANISMS, check_budget, square_side
from foveal.pools.reference.model import Generation, ReferenceVLM
from foveal.pools.reference.tokenizer import Tokenizer

__all__ = [
    "Completion",
    "EngineSettings",
    "NotAccepting",
    "PoolEngine",
    "QueueFull",
    "check_tier",
    "completion_of",
    "token_bytes",
    "tier_tokens",
]

logger = logging.getLogger(__name__)

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class EngineSettings:
    """How an engine batches and how much it queues."""

    max_batch: int = 8  # requests in one forward pass
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue: int = 64  # requests waiting (not yet in a batch) before new ones get 429
    max_new_tokens: int = 48  # hard cap on generated tokens, whatever max_tokens asks
    threads: int | None = None  # torch intra-op threads (process-wide), set by the worker

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests: come back after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotAccepting(Exception):
    """The engine is draining or closed and takes no new requests."""


@dataclass(frozen=True)
class Completion:
    """One request's answer, cut to its ``max_tokens`` and stop strings."""

    text: str
    token_ids: list[int]  # the answer's tokens (no end-of-sequence token)
    tokens: list[str]  # the text of each token (a partial UTF-8 character shows as U+FFFD)
    token_bytes: list[bytes]  # the bytes of each token: together, the UTF-8 of the answer
    logprobs: list[float]  # log-probability of each token, as generated (greedy)
    prompt_tokens: int  # visual tokens + text tokens of the prompt
    finish_reason: Literal["stop", "length"]
    #: per token, the most likely tokens at its step as (token id, log-probability), most
    #: likely first (up to 20; the model's own choice is the first)
    alternatives: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class _Job:
    image: torch.Tensor  # (3, S, S) in [0, 1]
    question: str
    max_tokens: int
    stop: tuple[str, ...]
    future: asyncio.Future[Completion]
    enqueued: float = field(default_factory=time.monotonic)


def tier_tokens(tier: str) -> int:
    """The visual-token budget in a tier name ``tN`` (``t16`` -> 16); a clear error otherwise."""
    digits = tier[1:]
    if len(tier) < 2 or tier[0] != "t" or not digits.isdigit() or int(digits) < 1:
        raise ValueError(
            f"cannot read a token budget from tier name {tier!r} (expected tN, e.g. t16); "
            "give the budget explicitly (--visual-tokens)"
        )
    return int(digits)


def check_tier(visual_tokens: int, mechanism: str, max_tokens: int = 256) -> None:
    """Raise ValueError unless ``mechanism`` can produce ``visual_tokens`` tokens per image."""
    if mechanism not in MECHANISMS:
        raise ValueError(
            f"unknown mechanism {mechanism!r}; expected one of {', '.join(MECHANISMS)}"
        )
    check_budget(visual_tokens, max_tokens)
    if mechanism in ("resolution", "pool"):
        try:
            square_side(visual_tokens)
        except ValueError:
            raise ValueError(
                f"mechanism {mechanism!r} needs a square token budget (1, 4, 16, 64, 256), "
                f"got {visual_tokens}; cls-topk and kcenter take any budget"
            ) from None


class _Metrics:
    """The engine's own Prometheus registry (several engines share a process in `foveal up`)."""

    def __init__(self, registry: CollectorRegistry, tier: str, model: str, mechanism: str) -> None:
        r = registry
        labels = {"tier": tier}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["tier"], registry=r).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, ["tier"], registry=r).labels(**labels)

        info = Gauge(
            "foveal_pool_server_info",
            "Always 1: what this pool server serves.",
            ["tier", "model_name", "mechanism"],
            registry=r,
        )
        info.labels(tier, model, mechanism).set(1)
        self.visual_tokens = gauge("foveal_pool_server_visual_tokens", "Visual tokens per image.")
        self.running = gauge(
            "foveal_pool_server_requests_running", "Requests in the forward pass now running."
        )
        self.waiting = gauge(
            "foveal_pool_server_requests_waiting", "Requests queued for the next forward pass."
        )
        self.queue_limit = gauge(
            "foveal_pool_server_queue_limit", "Waiting requests beyond which new ones get 429."
        )
        self.prompt_tokens = counter(
            "foveal_pool_server_prompt_tokens", "Prompt tokens processed (visual + text)."
        )
        self.generation_tokens = counter(
            "foveal_pool_server_generation_tokens", "Tokens generated (answers as returned)."
        )
        self.forward_passes = counter(
            "foveal_pool_server_forward_passes", "Batched forward passes (generate calls)."
        )
        finished = Counter(
            "foveal_pool_server_requests",
            "Requests finished, by outcome (stop, length, error).",
            ["tier", "outcome"],
            registry=r,
        )
        self.finished = {o: finished.labels(tier, o) for o in ("stop", "length", "error")}
        rejected = Counter(
            "foveal_pool_server_requests_rejected",
            "Requests refused before queueing, by reason (queue_full, draining).",
            ["tier", "reason"],
            registry=r,
        )
        self.rejected = {o: rejected.labels(tier, o) for o in ("queue_full", "draining")}
        self.batch_size = Histogram(
            "foveal_pool_server_batch_size",
            "Requests per forward pass.",
            ["tier"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.batch_seconds = Histogram(
            "foveal_pool_server_batch_duration_seconds",
            "Time of one batched forward pass.",
            ["tier"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.queue_seconds = Histogram(
            "foveal_pool_server_queue_duration_seconds",
            "Time a request waited before its forward pass started.",
            ["tier"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.request_seconds = Histogram(
            "foveal_pool_server_request_duration_seconds",
            "Time from a request entering the queue to its answer.",
            ["tier"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        ).labels(**labels)


class PoolEngine:
    """Batches requests for one tier (a token budget and mechanism) of a reference VLM.

    ``model`` may be shared by several engines (one per tier in `foveal up`): inference does
    not mutate it. ``executor`` runs the forward passes; engines that share one share its
    threads (the local stack uses one thread for every tier, so tiers take turns on the CPU).
    Without one, the engine makes its own single-thread executor. The worker task starts on the
    first request (or :meth:`start`) in the running event loop.
    """

    def __init__(
        self,
        model: ReferenceVLM,
        *,
        visual_tokens: int,
        mechanism: str = "resolution",
        model_name: str = "foveal-ref",
        tier: str | None = None,
        settings: EngineSettings | None = None,
        executor: Executor | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        check_tier(visual_tokens, mechanism, model.config.max_tokens)
        self.model = model
        self.visual_tokens = visual_tokens
        self.mechanism = mechanism
        self.model_name = model_name
        self.tier = tier or f"t{visual_tokens}"
        self.settings = s = settings or EngineSettings()
        self.image_size = model.config.image_size
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = m = _Metrics(self.registry, self.tier, model_name, mechanism)
        m.visual_tokens.set(visual_tokens)
        m.queue_limit.set(s.max_queue)
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            1, thread_name_prefix=f"pool-{self.tier}", initializer=self._init_thread
        )
        self._pending: deque[_Job] = deque()
        self._running = 0
        self._draining = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._lock = threading.Lock()  # begin_drain may come from a signal handler's thread
        self.forward_passes = 0  # batched generate calls so far
        self._batch_ewma_s = 0.05  # smoothed forward time, for Retry-After estimates
        self._last_batch = 0  # size of the last batch: > 1 means concurrent load

    # -- state -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Takes requests: loaded, not draining, not closed."""
        return not (self._draining or self._closed)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def waiting(self) -> int:
        """Requests queued for a forward pass (cancelled ones included until skipped)."""
        return len(self._pending)

    @property
    def running(self) -> int:
        """Requests in the forward pass now running."""
        return self._running

    # -- lifecycle -------------------------------------------------------------------------

    def _init_thread(self) -> None:
        if self.settings.threads is not None:
            torch.set_num_threads(self.settings.threads)

    async def start(self) -> None:
        """Start the worker in the running loop (idempotent; requests start it too)."""
        if self._worker is not None:
            return
        if self._closed:
            raise NotAccepting(f"the {self.tier} pool engine is closed")
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker = asyncio.create_task(self._work(), name=f"pool-engine-{self.tier}")

    def begin_drain(self) -> None:
        """Refuse new requests from now on; queued and running ones still get answers.

        Safe to call from any thread (a signal handler, another event loop).
        """
        with self._lock:
            self._draining = True
            loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(wakeup.set)  # a gathering batch stops waiting
            except RuntimeError:  # the loop closed meanwhile
                pass

    async def drain(self) -> None:
        """Stop accepting, then return once every queued and running request is answered."""
        self.begin_drain()
        if self._worker is None or self._idle is None:
            return
        assert self._wakeup is not None
        self._wakeup.set()
        while self._pending or self._running:
            self._idle.clear()
            if not (self._pending or self._running):
                break
            await self._idle.wait()

    async def close(self) -> None:
        """Drain, stop the worker and release the executor (if the engine made it)."""
        await self.drain()
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        if self._own_executor:
            self._executor.shutdown(wait=False)

    # -- requests --------------------------------------------------------------------------

    async def generate(
        self,
        image: torch.Tensor,
        question: str,
        *,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
    ) -> Completion:
        """The answer to ``question`` about ``image`` (3, S, S) in [0, 1], from a batch.

        Raises :class:`QueueFull` or :class:`NotAccepting` at once when the request cannot
        queue; the forward pass's own errors come back as they are.
        """
        if not self.ready:
            self.metrics.rejected["draining"].inc()
            raise NotAccepting(f"the {self.tier} pool is shutting down and takes no new requests")
        if len(self._pending) >= self.settings.max_queue:
            self.metrics.rejected["queue_full"].inc()
            retry = self.retry_after_s()
            raise QueueFull(
                f"the {self.tier} pool's queue is full ({self.settings.max_queue} requests "
                f"waiting); retry in {retry} s",
                retry,
            )
        if self._worker is None:
            await self.start()
        assert self._loop is not None and self._wakeup is not None and self._idle is not None
        limit = min(max_tokens or self.settings.max_new_tokens, self.settings.max_new_tokens)
        job = _Job(image, question, limit, tuple(s for s in stop if s), self._loop.create_future())
        self._pending.append(job)
        self.metrics.waiting.set(len(self._pending))
        self._idle.clear()
        self._wakeup.set()
        return await job.future

    def retry_after_s(self) -> int:
        """Whole seconds until the queue has likely moved on by one full queue's worth."""
        batches = math.ceil(len(self._pending) / self.settings.max_batch) + 1
        return max(1, math.ceil(batches * self._batch_ewma_s))

    # -- the worker ------------------------------------------------------------------------

    async def _work(self) -> None:
        assert self._wakeup is not None and self._idle is not None and self._loop is not None
        wakeup, loop, s = self._wakeup, self._loop, self.settings
        while True:
            while not self._pending:
                self._idle.set()
                wakeup.clear()
                await wakeup.wait()
            # Wait for company only under concurrent load (the last batch had some): a lone
            # client would pay the wait on every request and gain nothing.
            wait = s.batch_wait_ms / 1000.0 if self._last_batch > 1 else 0.0
            deadline = loop.time() + wait
            while len(self._pending) < s.max_batch and not self._draining:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                wakeup.clear()
                try:
                    await asyncio.wait_for(wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch: list[_Job] = []
            while self._pending and len(batch) < s.max_batch:
                job = self._pending.popleft()
                if not job.future.done():  # skip requests whose caller went away
                    batch.append(job)
            self.metrics.waiting.set(len(self._pending))
            if batch:
                self._last_batch = len(batch)
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Job]) -> None:
        assert self._loop is not None
        m = self.metrics
        self._running = len(batch)
        m.running.set(len(batch))
        started = time.monotonic()
        for job in batch:
            m.queue_seconds.observe(started - job.enqueued)
        longest = max(job.max_tokens for job in batch)
        images = [job.image for job in batch]
        questions = [job.question for job in batch]
        try:
            generations = await self._loop.run_in_executor(
                self._executor, self._forward, images, questions, longest
            )
        except Exception as exc:
            logger.exception(
                "forward pass of %d request(s) failed (tier %s)", len(batch), self.tier
            )
            for job in batch:
                m.finished["error"].inc()
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            elapsed = time.monotonic() - started
            self._batch_ewma_s = 0.8 * self._batch_ewma_s + 0.2 * elapsed
            self.forward_passes += 1
            m.forward_passes.inc()
            m.batch_size.observe(len(batch))
            m.batch_seconds.observe(elapsed)
            self._running = 0
            m.running.set(0)
        done = time.monotonic()
        tokenizer = self.model.tokenizer
        for job, gen in zip(batch, generations, strict=True):
            try:
                completion = completion_of(gen, job.max_tokens, job.stop, tokenizer)
            except Exception as exc:  # never leave a caller waiting on a dead future
                logger.exception("cutting an answer failed (%s)", self.tier)
                m.finished["error"].inc()
                if not job.future.done():
                    job.future.set_exception(exc)
                continue
            m.prompt_tokens.inc(completion.prompt_tokens)
            m.generation_tokens.inc(completion.completion_tokens)
            m.finished[completion.finish_reason].inc()
            m.request_seconds.observe(done - job.enqueued)
            if not job.future.done():
                job.future.set_result(completion)

    def _forward(
        self, images: list[torch.Tensor], questions: list[str], max_new_tokens: int
    ) -> list[Generation]:
        batch = torch.stack(images)
        return self.model.generate(
            batch, questions, self.visual_tokens, self.mechanism, max_new_tokens=max_new_tokens
        )


def completion_of(
    gen: Generation, limit: int, stop: Sequence[str], tokenizer: Tokenizer
) -> Completion:
    """``gen`` cut to ``limit`` tokens and at the first stop string, with its finish reason.

    ``finish_reason`` is ``stop`` when the end-of-sequence token came within ``limit`` tokens
    or a stop string was found, else ``length``: what a solo run with ``max_new_tokens=limit``
    would report.
    """
    decode = tokenizer.decode
    ids = gen.token_ids
    # The end-of-sequence token has a log-probability but no id in token_ids.
    ended = len(gen.logprobs) > len(ids)
    finish: Literal["stop", "length"] = "stop" if ended and len(ids) < limit else "length"
    ids = ids[:limit]
    text = decode(ids)
    stops = tuple(s for s in stop if s)
    if stops:
        cut = _first_stop(decode, ids, stops)
        if cut is not None:
            ids, text, finish = ids[: cut[0]], cut[1], "stop"
    return Completion(
        text=text,
        token_ids=list(ids),
        tokens=[decode([i]) for i in ids],
        token_bytes=[token_bytes(tokenizer, i) for i in ids],
        logprobs=list(gen.logprobs[: len(ids)]),
        prompt_tokens=gen.prompt_tokens,
        finish_reason=finish,
        alternatives=list(gen.alternatives[: len(ids)]),
    )


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """The bytes a token stands for (a byte-fallback token: one byte of a UTF-8 character)."""
    pieces = getattr(tokenizer, "_pieces", None)  # decode() would turn lone bytes into U+FFFD
    if isinstance(pieces, list) and 0 <= token < len(pieces):
        return bytes(pieces[token])
    return tokenizer.decode([token]).encode()


def _first_stop(
    decode: Callable[[list[int]], str], ids: list[int], stop: tuple[str, ...]
) -> tuple[int, str] | None:
    """(tokens to keep, text before the stop string) at the first token completing a stop."""
    for n in range(1, len(ids) + 1):
        text = decode(ids[:n])
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return n, text[: min(hits)]
    return None
