"""The pool engine's batching, queue bound, draining and answer cutting, on a real (random) VLM.

Forward passes run on an executor the test controls: a "gate" job occupies its only thread, so
requests pile up exactly where the test wants them until it opens the gate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import torch

from foveal.pools.engine import (
    EngineSettings,
    NotAccepting,
    PoolEngine,
    QueueFull,
    check_tier,
    completion_of,
    tier_tokens,
    token_bytes,
)
from foveal.pools.reference.model import Generation, ReferenceVLM, build_model
from foveal.pools.reference.tokenizer import EOS
from foveal.testing.gate import Gate, closed_gate

QUESTION = "What is the dominant colour?"


@pytest.fixture(scope="module")
def model() -> Iterator[ReferenceVLM]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a shared CPU
    torch.manual_seed(0)
    yield build_model().eval()
    torch.set_num_threads(threads)


@pytest.fixture
def image() -> torch.Tensor:
    return torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def gate() -> Iterator[Gate]:
    with closed_gate() as g:
        yield g


@pytest.fixture
async def make_engine(model: ReferenceVLM) -> AsyncIterator[Callable[..., Awaitable[PoolEngine]]]:
    engines: list[PoolEngine] = []

    async def make(**kw: Any) -> PoolEngine:
        settings = EngineSettings(
            **{"max_batch": 8, "batch_wait_ms": 1.0, "max_new_tokens": 4, **kw.pop("s", {})}
        )
        tokens = kw.pop("visual_tokens", 16)
        engine = PoolEngine(model, visual_tokens=tokens, settings=settings, **kw)
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.close()


async def until(cond: Callable[[], bool]) -> None:
    """Wait (generously bounded) until ``cond()`` holds; a missed state fails the test."""
    for _ in range(10_000):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("state not reached")


def sample(engine: PoolEngine, name: str, **labels: str) -> float:
    value = engine.registry.get_sample_value(name, {"tier": engine.tier, **labels})
    assert value is not None, name
    return value


# -- tiers ------------------------------------------------------------------------------


@pytest.mark.parametrize(("tier", "tokens"), [("t1", 1), ("t16", 16), ("t256", 256)])
def test_tier_tokens_read_the_budget(tier: str, tokens: int) -> None:
    assert tier_tokens(tier) == tokens


@pytest.mark.parametrize("tier", ["t0", "16", "tx", "t", "big", "T16"])
def test_tier_names_without_a_budget_are_refused(tier: str) -> None:
    with pytest.raises(ValueError, match="expected tN"):
        tier_tokens(tier)


@pytest.mark.parametrize(
    ("tokens", "mechanism", "message"),
    [
        (16, "blur", "unknown mechanism 'blur'"),
        (8, "resolution", "needs a square token budget"),
        (12, "pool", "needs a square token budget"),
        (512, "kcenter", "between 1 and 256"),
        (0, "cls-topk", "between 1 and 256"),
    ],
)
def test_budgets_a_mechanism_cannot_do_are_refused(
    tokens: int, mechanism: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_tier(tokens, mechanism)


def test_any_budget_works_for_selection_mechanisms() -> None:
    check_tier(8, "kcenter")
    check_tier(12, "cls-topk")


def test_engine_refuses_an_impossible_tier(model: ReferenceVLM) -> None:
    with pytest.raises(ValueError, match="square token budget"):
        PoolEngine(model, visual_tokens=8, mechanism="resolution")


# -- cutting answers ----------------------------------------------------------------------


class _Letters:
    """A stand-in tokenizer: token i is the letter ``chr(97 + i)``."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


_decode = _Letters().decode
LETTERS: Any = _Letters()


@pytest.mark.parametrize(
    ("ids", "ended", "limit", "want_ids", "finish"),
    [
        ([1, 2, 3], True, 8, [1, 2, 3], "stop"),  # EOS within the limit
        ([1, 2, 3], True, 3, [1, 2, 3], "length"),  # EOS would be the 4th token
        ([1, 2, 3, 4, 5], True, 2, [1, 2], "length"),  # cut by a smaller max_tokens
        ([1, 2, 3], False, 3, [1, 2, 3], "length"),  # the batch's cap
    ],
)
def test_answers_are_cut_to_their_own_limit(
    ids: list[int], ended: bool, limit: int, want_ids: list[int], finish: str
) -> None:
    lps = [-0.1 * (i + 1) for i in range(len(ids) + (1 if ended else 0))]
    gen = Generation(_decode(ids), ids, lps, prompt_tokens=20)
    c = completion_of(gen, limit, (), LETTERS)
    assert (c.token_ids, c.finish_reason) == (want_ids, finish)
    assert c.text == _decode(want_ids) and c.tokens == [_decode([i]) for i in want_ids]
    assert b"".join(c.token_bytes) == c.text.encode()
    assert c.logprobs == lps[: len(want_ids)] and c.completion_tokens == len(want_ids)
    assert c.prompt_tokens == 20


def test_a_stop_string_ends_the_answer_before_it() -> None:
    ids = [0, 1, 2, 3, 4]  # "abcde"
    gen = Generation("abcde", ids, [-0.5] * 5, prompt_tokens=3)
    c = completion_of(gen, 10, ["cd", "zz"], LETTERS)
    assert (c.text, c.token_ids, c.finish_reason) == ("ab", [0, 1, 2, 3], "stop")
    assert completion_of(gen, 10, ["zz"], LETTERS).text == "abcde"


# -- batching -------------------------------------------------------------------------------


async def test_concurrent_requests_share_forward_passes(
    make_engine: Callable[..., Awaitable[PoolEngine]], gate: Gate, image: torch.Tensor
) -> None:
    engine = await make_engine(executor=gate.executor)
    tasks = [asyncio.create_task(engine.generate(image, QUESTION)) for _ in range(8)]
    # The first batch is stuck behind the gate; the rest wait for the next forward pass.
    await until(lambda: engine.running + engine.waiting == 8 and engine.running > 0)
    gate.open()
    answers = await asyncio.gather(*tasks)
    assert engine.forward_passes <= 2 < len(tasks)
    assert sample(engine, "foveal_pool_server_batch_size_count") == engine.forward_passes
    assert sample(engine, "foveal_pool_server_batch_size_sum") == 8
    text_tokens = len(engine.model.tokenizer.encode(QUESTION)) + 1  # + SEP
    assert {a.prompt_tokens for a in answers} == {16 + text_tokens}
    assert sample(engine, "foveal_pool_server_prompt_tokens_total") == 8 * (16 + text_tokens)
    generated = sum(a.completion_tokens for a in answers)
    assert sample(engine, "foveal_pool_server_generation_tokens_total") == generated
    assert all(1 <= a.completion_tokens <= 4 for a in answers)  # max_new_tokens caps
    assert all(lp <= 0 for a in answers for lp in a.logprobs)


async def test_batches_never_exceed_max_batch(
    make_engine: Callable[..., Awaitable[PoolEngine]], gate: Gate, image: torch.Tensor
) -> None:
    engine = await make_engine(executor=gate.executor, s={"max_batch": 3})
    tasks = [asyncio.create_task(engine.generate(image, QUESTION)) for _ in range(10)]
    await until(lambda: engine.running + engine.waiting == 10 and engine.running > 0)
    gate.open()
    await asyncio.gather(*tasks)
    count = sample(engine, "foveal_pool_server_batch_size_count")
    assert sample(engine, "foveal_pool_server_batch_size_bucket", le="4.0") == count
    assert sample(engine, "foveal_pool_server_batch_size_sum") == 10
    assert engine.forward_passes >= 4  # ceil(10 / 3)


async def test_a_batch_of_mixed_max_tokens_cuts_each_answer(
    make_engine: Callable[..., Awaitable[PoolEngine]], gate: Gate, image: torch.Tensor
) -> None:
    engine = await make_engine(executor=gate.executor, s={"max_new_tokens": 16})
    first = asyncio.create_task(engine.generate(image, QUESTION, max_tokens=1))
    await until(lambda: engine.running == 1)
    short = asyncio.create_task(engine.generate(image, QUESTION, max_tokens=1))
    long = asyncio.create_task(engine.generate(image, QUESTION, max_tokens=6))
    await until(lambda: engine.waiting == 2)
    gate.open()
    a, b, c = await asyncio.gather(first, short, long)
    assert engine.forward_passes == 2  # short and long shared one
    assert a.completion_tokens <= 1 and b.completion_tokens <= 1
    if b.finish_reason == "length":  # the untrained model rarely ends early
        assert b.token_ids == c.token_ids[:1] and b.logprobs == pytest.approx(c.logprobs[:1])


async def test_a_waiting_request_whose_caller_left_is_skipped(
    make_engine: Callable[..., Awaitable[PoolEngine]], gate: Gate, image: torch.Tensor
) -> None:
    engine = await make_engine(executor=gate.executor)
    first = asyncio.create_task(engine.generate(image, QUESTION))
    await until(lambda: engine.running == 1)
    gone = asyncio.create_task(engine.generate(image, QUESTION))
    kept = asyncio.create_task(engine.generate(image, QUESTION))
    await until(lambda: engine.waiting == 2)
    gone.cancel()
    gate.open()
    await asyncio.gather(first, kept)
    assert sample(engine, "foveal_pool_server_batch_size_sum") == 2


# -- queue bound, errors, draining ------------------------------------------------------------


async def test_a_full_queue_refuses_at_once(
    make_engine: Callable[..., Awaitable[PoolEngine]], gate: Gate, image: torch.Tensor
) -> None:
    engine = await make_engine(executor=gate.executor, s={"max_batch": 1, "max_queue": 2})
    running = asyncio.create_task(engine.generate(image, QUESTION))
    await until(lambda: engine.running == 1)
    queued = [asyncio.create_task(engine.generate(image, QUESTION)) for _ in range(2)]
    await until(lambda: engine.waiting == 2)
    with pytest.raises(QueueFull, match="queue is full") as info:
        await engine.generate(image, QUESTION)
    assert info.value.retry_after_s >= 1
    assert sample(engine, "foveal_pool_server_requests_rejected_total", reason="queue_full") == 1
    gate.open()
    assert len(await asyncio.gather(running, *queued)) == 3  # nothing queued was lost


async def test_a_failed_forward_pass_fails_its_batch_only(
    make_engine: Callable[..., Awaitable[PoolEngine]], image: torch.Tensor
) -> None:
    engine = await make_engine()
    with pytest.raises(RuntimeError):
        await engine.generate(torch.rand(2, 128, 128), QUESTION)  # two channels: conv fails
    assert sample(engine, "foveal_pool_server_requests_total", outcome="error") == 1
    answer = await engine.generate(image, QUESTION)
    assert answer.completion_tokens >= 1


async def test_draining_refuses_new_requests_and_answers_queued_ones(
    make_engine: Callable[..., Awaitable[PoolEngine]], gate: Gate, image: torch.Tensor
) -> None:
    engine = await make_engine(executor=gate.executor, s={"max_batch": 1})
    tasks = [asyncio.create_task(engine.generate(image, QUESTION)) for _ in range(3)]
    await until(lambda: engine.running == 1 and engine.waiting == 2)
    drained = asyncio.create_task(engine.drain())
    await until(lambda: engine.draining)
    assert not engine.ready
    with pytest.raises(NotAccepting, match="shutting down"):
        await engine.generate(image, QUESTION)
    assert not drained.done()
    gate.open()
    await drained
    assert all(t.done() and not t.exception() for t in tasks)
    assert engine.waiting == engine.running == 0


async def test_a_lone_client_never_waits_for_company(
    make_engine: Callable[..., Awaitable[PoolEngine]], image: torch.Tensor
) -> None:
    engine = await make_engine(s={"batch_wait_ms": 3_600_000.0})
    for _ in range(3):  # an hour's wait per request would time the test out
        await engine.generate(image, QUESTION)
    assert engine.forward_passes == 3


async def test_drain_stops_a_batch_waiting_for_company(
    make_engine: Callable[..., Awaitable[PoolEngine]], gate: Gate, image: torch.Tensor
) -> None:
    engine = await make_engine(s={"batch_wait_ms": 3_600_000.0}, executor=gate.executor)
    first = [asyncio.create_task(engine.generate(image, QUESTION)) for _ in range(2)]
    await until(lambda: engine.running == 2)  # concurrent load: the next batch waits
    gate.open()
    await asyncio.gather(*first)
    # A batch that would wait an hour for company runs as soon as the engine drains.
    task = asyncio.create_task(engine.generate(image, QUESTION))
    await until(lambda: engine.waiting == 1)
    await asyncio.sleep(0.05)
    assert not task.done()  # it is waiting for company
    await asyncio.wait_for(engine.drain(), timeout=60)
    assert task.done() and task.result().completion_tokens >= 1


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        EngineSettings(max_batch=0)
    with pytest.raises(ValueError, match="batch_wait_ms"):
        EngineSettings(batch_wait_ms=-1)


def test_token_bytes_keep_partial_utf8_characters(model: ReferenceVLM) -> None:
    tok = model.tokenizer
    ids = tok.encode("é ok")  # é is two byte-fallback tokens
    raw = [token_bytes(tok, i) for i in ids]
    assert b"".join(raw) == "é ok".encode() and raw[0] == b"\xc3"


def test_eos_is_not_an_answer_token(model: ReferenceVLM) -> None:
    # The engine's finish logic relies on generate() reporting EOS only as an extra logprob.
    img = torch.rand(1, 3, 128, 128)
    gen = model.generate(img, [QUESTION], 4, "resolution", max_new_tokens=3)[0]
    assert EOS not in gen.token_ids
    assert len(gen.logprobs) in (len(gen.token_ids), len(gen.token_ids) + 1)
