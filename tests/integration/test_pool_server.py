"""The reference pool server over real HTTP: the pool contract, bad input, the queue bound,
graceful shutdown, metrics, `foveal pool serve`, and the local stack on reference pools.

The model is a small randomly initialised reference VLM saved to a temporary checkpoint: real
forward passes, no dependence on the trained weights.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from foveal.config import PoolClientSettings
from foveal.errors import InvalidRequest
from foveal.pools import Catalog, CatalogHolder, Endpoint, PoolClient, Tier
from foveal.pools.engine import EngineSettings, PoolEngine
from foveal.pools.reference.checkpoint import load_checkpoint, save_checkpoint
from foveal.pools.reference.model import ReferenceVLM, build_model
from foveal.pools.server import PoolServer
from foveal.testing.gate import Gate, closed_gate
from foveal.testing.images import image_message, png_data_uri
from foveal.testing.stack import running_stack

MODEL = "foveal-ref"
QUESTION = "What is the dominant colour?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "ref.pt"
    save_checkpoint(build_model(), path)
    return path


@pytest.fixture(scope="module")
def vlm(checkpoint: Path) -> Iterator[ReferenceVLM]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_checkpoint(checkpoint)
    torch.set_num_threads(threads)


def _engine(vlm: ReferenceVLM, tokens: int, **kw: Any) -> PoolEngine:
    settings = {"max_batch": 4, "batch_wait_ms": 2.0, "max_new_tokens": 8, "threads": 1}
    settings.update(kw.pop("s", {}))
    return PoolEngine(vlm, visual_tokens=tokens, settings=EngineSettings(**settings), **kw)


@pytest.fixture(scope="module")
def pools(vlm: ReferenceVLM) -> Iterator[dict[str, PoolServer]]:
    """Reference pools for t1 and t16 on loopback, shared by the module's contract tests."""
    servers = {f"t{k}": PoolServer(_engine(vlm, k)).start() for k in (1, 16)}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def gate() -> Iterator[Gate]:
    with closed_gate() as g:
        yield g


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


async def _ask(client: openai.AsyncOpenAI, **params: Any) -> Any:
    """The served model's answer to QUESTION about the test image (``params``: the rest)."""
    return await client.chat.completions.create(
        model=MODEL,
        messages=[image_message(QUESTION)],  # type: ignore[list-item]
        **params,
    )


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [image_message(QUESTION)], "max_tokens": 6, **extra}


async def until(cond: Any) -> None:
    for _ in range(20_000):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("state not reached")


def _text_tokens(vlm: ReferenceVLM, text: str) -> int:
    return len(vlm.tokenizer.encode(text)) + 1  # + SEP


# -- the contract ---------------------------------------------------------------------------


async def test_openai_client_gets_answer_logprobs_and_usage(
    pools: dict[str, PoolServer], vlm: ReferenceVLM
) -> None:
    async with _client(pools["t16"].url) as client:
        resp = await _ask(client, max_tokens=6, logprobs=True, top_logprobs=1)
    assert resp.model == MODEL and resp.object == "chat.completion"
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    content = choice.logprobs.content  # type: ignore[union-attr]
    assert resp.usage is not None and 1 <= resp.usage.completion_tokens <= 6
    assert content is not None and len(content) == resp.usage.completion_tokens
    assert all(t.logprob <= 0 and t.top_logprobs[0].token == t.token for t in content)
    raw = b"".join(bytes(t.bytes or []) for t in content)
    assert raw.decode("utf-8", "replace") == choice.message.content
    assert resp.usage.prompt_tokens == 16 + _text_tokens(vlm, QUESTION)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


async def test_top_logprobs_lists_the_most_likely_tokens_in_order(
    pools: dict[str, PoolServer],
) -> None:
    async with _client(pools["t16"].url) as client:
        resp = await _ask(client, max_tokens=4, logprobs=True, top_logprobs=5)
        stream = await _ask(client, max_tokens=4, logprobs=True, top_logprobs=3, stream=True)
        streamed = [
            c.choices[0].logprobs.content[0]
            async for c in stream
            if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content
        ]
        bare = await _ask(client, max_tokens=4, logprobs=True)
    content = resp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content
    for entry in content:
        alts = entry.top_logprobs
        assert len(alts) == 5
        assert (alts[0].token, alts[0].logprob) == (entry.token, entry.logprob)  # greedy
        lps = [a.logprob for a in alts]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        assert sum(math.exp(lp) for lp in lps) <= 1 + 1e-6
        assert len({bytes(a.bytes or []) for a in alts}) == 5  # five different tokens
    # the stream carries the same alternatives, cut to its own top_logprobs
    assert [e.token for e in streamed] == [e.token for e in content]
    for s, whole in zip(streamed, content, strict=True):
        assert [a.token for a in s.top_logprobs] == [a.token for a in whole.top_logprobs[:3]]
    bare_content = bare.choices[0].logprobs.content  # type: ignore[union-attr]
    assert bare_content and all(e.top_logprobs == [] for e in bare_content)


async def test_prompt_tokens_count_the_tiers_visual_tokens(pools: dict[str, PoolServer]) -> None:
    usage = {}
    for tier in ("t1", "t16"):
        async with _client(pools[tier].url) as client:
            resp = await _ask(client, max_tokens=2)
        assert resp.usage is not None
        usage[tier] = resp.usage.prompt_tokens
    assert usage["t16"] - usage["t1"] == 15


async def test_streaming_sends_the_same_answer_token_by_token(
    pools: dict[str, PoolServer],
) -> None:
    async with _client(pools["t16"].url) as client:
        whole = await _ask(client, max_tokens=6)
        stream = await _ask(
            client, max_tokens=6, stream=True, stream_options={"include_usage": True}, logprobs=True
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    tokens = [c for c in chunks if c.choices and c.choices[0].logprobs is not None]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert whole.usage is not None and len(tokens) == whole.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.model == MODEL and c.id == chunks[0].id for c in chunks)


async def test_the_router_pool_client_reads_the_reference_pool(
    pools: dict[str, PoolServer],
) -> None:
    tiers = tuple(
        Tier(name, int(name[1:]), 1.0, "reference", MODEL, (Endpoint(server.url, MODEL),))
        for name, server in pools.items()
    )
    settings = PoolClientSettings(health_interval_s=60.0, breaker_failures=2)
    payload = {"messages": [image_message(QUESTION)], "max_tokens": 4, "logprobs": True}
    async with PoolClient(CatalogHolder(Catalog(tiers)), settings) as client:
        await client.check_health()
        assert client.available("t1") == client.available("t16") == 1
        result = await client.complete(["t16"], payload, deadline=time.monotonic() + 30)
        assert result.tier == "t16" and result.body["model"] == MODEL
        assert result.body["choices"][0]["logprobs"]["content"]
        stream = await client.stream(
            ["t1"], {**payload, "stream": True, "stream_options": {"include_usage": True}},
            deadline=time.monotonic() + 30,
        )  # fmt: skip
        async with stream:
            chunks = [chunk async for chunk in stream]
        assert stream.finished and chunks[-1]["usage"]["prompt_tokens"] > 1
        text_only = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        with pytest.raises(InvalidRequest, match="exactly one image"):
            await client.complete(["t1"], text_only, deadline=time.monotonic() + 30)
        assert client.available("t1") == 1  # the request was at fault, not the pool


async def test_models_and_health(pools: dict[str, PoolServer]) -> None:
    async with aiohttp.ClientSession(pools["t1"].url) as http:
        async with http.get("/v1/models") as resp:
            models = await resp.json()
        async with http.get("/health") as resp:
            assert resp.status == 200
    assert [m["id"] for m in models["data"]] == [MODEL] and models["object"] == "list"


def _uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


_PNG = base64.b64decode(png_data_uri(64, 64).partition(",")[2])


def _with_image(url: str) -> dict[str, Any]:
    return _body(messages=[image_message(QUESTION, url)])


def _two_images() -> dict[str, Any]:
    msg = image_message(QUESTION)
    msg["content"].append({"type": "image_url", "image_url": {"url": png_data_uri()}})
    return _body(messages=[msg])


BAD: list[Any] = [
    pytest.param(_body(messages=[{"role": "user", "content": QUESTION}]),
                 400, "exactly one image per request, got 0", "messages", id="no-image"),
    pytest.param(_two_images(), 400, "exactly one image per request, got 2", "messages",
                 id="two-images"),
    pytest.param(_with_image("data:image/png;base64,@@@not-base64"), 400,
                 "invalid base64 image data", "messages.0.content.1.image_url.url",
                 id="bad-base64"),
    pytest.param(_with_image(_uri(b"this is not a picture")), 400,
                 "unsupported image: the data (declared image/png) is no image",
                 "messages.0.content.1.image_url.url", id="not-an-image"),
    pytest.param(_with_image(_uri(_PNG[:60])), 400, "broken image/png image",
                 "messages.0.content.1.image_url.url", id="truncated-png"),
    pytest.param(_with_image("https://example.com/cat.png"), 400, "only data: image URLs",
                 "messages.0.content.1.image_url.url", id="remote-url"),
    pytest.param(_with_image("data:text/plain;base64,aGk="), 400, "invalid image data URI",
                 "messages.0.content.1.image_url.url", id="not-image-mime"),
    pytest.param(_body(messages=[{"role": "assistant", "content": image_message("x")["content"]}]),
                 400, "only read from user messages", "messages.0.content", id="assistant-image"),
    pytest.param(_body(max_tokens=0), 400, "max_tokens", "max_tokens", id="max-tokens-0"),
    pytest.param(_body(n=2), 400, "n:", "n", id="n-2"),
    pytest.param(_body(messages=[]), 400, "messages", "messages", id="no-messages"),
    pytest.param({"messages": [image_message(QUESTION)]}, 400, "model: Field required",
                 "model", id="no-model"),
    pytest.param(_body(model="gpt-4o"), 404, "this pool serves `foveal-ref`", "model",
                 id="other-model"),
    pytest.param([1, 2], 400, "must be a JSON object", None, id="not-an-object"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "message", "param"), BAD)
async def test_bad_input_gets_a_clear_error(
    pools: dict[str, PoolServer], body: Any, status: int, message: str, param: str | None
) -> None:
    async with aiohttp.ClientSession(pools["t16"].url) as http:
        async with http.post("/v1/chat/completions", json=body) as resp:
            assert resp.status == status
            error = (await resp.json())["error"]
    assert message in error["message"], error
    assert error["param"] == param and error["code"] == status


async def test_a_large_photo_is_answered(pools: dict[str, PoolServer]) -> None:
    noise = Image.frombytes("RGB", (320, 320), os.urandom(320 * 320 * 3))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")  # ~300 KB: decoded in a worker thread, off the event loop
    async with aiohttp.ClientSession(pools["t16"].url) as http:
        status, _, body = await _post(http, _with_image(_uri(buf.getvalue())))
    assert status == 200 and body["usage"]["prompt_tokens"] > 16


async def test_invalid_json_is_a_bad_request(pools: dict[str, PoolServer]) -> None:
    async with aiohttp.ClientSession(pools["t16"].url) as http:
        async with http.post("/v1/chat/completions", data=b"{not json") as resp:
            assert resp.status == 400
            assert "invalid JSON body" in (await resp.json())["error"]["message"]


async def test_metrics_pass_promtool(pools: dict[str, PoolServer]) -> None:
    async with _client(pools["t1"].url) as client:
        await _ask(client, max_tokens=2)
    async with aiohttp.ClientSession(pools["t1"].url) as http:
        async with http.get("/metrics") as resp:
            text = await resp.text()
    for name in (
        'foveal_pool_server_requests_running{tier="t1"}',
        'foveal_pool_server_requests_waiting{tier="t1"}',
        'foveal_pool_server_prompt_tokens_total{tier="t1"}',
        'foveal_pool_server_generation_tokens_total{tier="t1"}',
        "foveal_pool_server_batch_size_bucket",
        "foveal_pool_server_request_duration_seconds_bucket",
    ):
        assert name in text, name
    assert "foveal_router_" not in text  # a registry of its own, not the process's
    check = await asyncio.to_thread(
        subprocess.run,
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


# -- load: batching, the queue bound, shutdown -----------------------------------------------


@pytest.fixture
async def gated(vlm: ReferenceVLM, gate: Gate) -> AsyncIterator[PoolServer]:
    """A t4 pool whose forward passes wait for the gate: one at a time, a queue of two."""
    engine = _engine(vlm, 4, s={"max_batch": 1, "max_queue": 2}, executor=gate.executor)
    server = PoolServer(engine).start()
    yield server
    gate.open()
    await asyncio.to_thread(server.stop)


async def _post(http: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[int, Any, Any]:
    async with http.post("/v1/chat/completions", json=body) as resp:
        return resp.status, resp.headers, await resp.json()


async def test_concurrent_http_requests_are_batched(vlm: ReferenceVLM, gate: Gate) -> None:
    engine = _engine(vlm, 16, s={"max_batch": 8}, executor=gate.executor)
    with PoolServer(engine) as server:
        async with aiohttp.ClientSession(server.url) as http:
            tasks = [asyncio.create_task(_post(http, _body())) for _ in range(8)]
            await until(lambda: engine.running + engine.waiting == 8 and engine.running > 0)
            gate.open()
            answers = await asyncio.gather(*tasks)
            async with http.get("/metrics") as resp:
                text = await resp.text()
    assert [status for status, _, _ in answers] == [200] * 8
    assert engine.forward_passes <= 2
    passes = re.search(r'foveal_pool_server_forward_passes_total\{tier="t16"\} (\S+)', text)
    assert passes and float(passes.group(1)) == engine.forward_passes
    assert 'foveal_pool_server_batch_size_sum{tier="t16"} 8.0' in text


async def test_a_full_queue_answers_429_with_retry_after(gated: PoolServer, gate: Gate) -> None:
    engine = gated.engine
    async with aiohttp.ClientSession(gated.url) as http:
        first = asyncio.create_task(_post(http, _body()))
        await until(lambda: engine.running == 1)
        queued = [asyncio.create_task(_post(http, _body())) for _ in range(2)]
        await until(lambda: engine.waiting == 2)
        status, headers, body = await _post(http, _body())
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert body["error"]["type"] == "RateLimitError"
        assert "queue is full (2 requests waiting)" in body["error"]["message"]
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            async with _client(gated.url) as client:
                await _ask(client)
        gate.open()
        done = await asyncio.gather(first, *queued)
    assert [status for status, _, _ in done] == [200, 200, 200]  # nothing queued was lost


async def test_a_draining_pool_refuses_new_work_and_finishes_queued_requests(
    gated: PoolServer, gate: Gate
) -> None:
    engine = gated.engine
    async with aiohttp.ClientSession(gated.url) as http:
        inflight = [asyncio.create_task(_post(http, _body())) for _ in range(3)]
        await until(lambda: engine.running == 1 and engine.waiting == 2)
        engine.begin_drain()  # as a host does before it stops the replica (Ray Serve)
        async with http.get("/health") as resp:
            assert resp.status == 503
        status, headers, body = await _post(http, _body())
        assert status == 503 and headers["Retry-After"] == "1"
        assert "shutting down" in body["error"]["message"]
        gated.begin_stop()  # then uvicorn stops listening and waits for requests in flight
        gate.open()
        done = await asyncio.gather(*inflight)
    assert [status for status, _, _ in done] == [200, 200, 200]
    assert all(isinstance(b["choices"][0]["message"]["content"], str) for _, _, b in done)
    assert await asyncio.to_thread(gated.join, 60)
    with pytest.raises(OSError):  # no longer listening
        await asyncio.to_thread(urllib.request.urlopen, gated.url + "/health", timeout=2)


def _foveal(*args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("FOVEAL_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "foveal", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _samples(exposition: str) -> dict[str, float]:
    """Each sample name's value, summed over its label sets."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def _read_until(proc: subprocess.Popen[str], marker: str, lines: list[str]) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            break
    return "".join(lines)


async def test_pool_serve_drains_on_sigterm_and_exits_0(checkpoint: Path) -> None:
    # One request per forward pass, each as long as allowed: a queue that takes a while.
    proc = _foveal(
        "pool", "serve", "--tier", "t256", "--port", "0", "--checkpoint", str(checkpoint),
        "--threads", "1", "--max-batch", "1", "--max-new-tokens", "32",
    )  # fmt: skip
    lines: list[str] = []
    try:
        out = _read_until(proc, "on http://", lines)
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", out)
        assert found, out
        async with aiohttp.ClientSession(found.group(1)) as http:
            inflight = [asyncio.create_task(_post(http, _body(max_tokens=32))) for _ in range(8)]
            for _ in range(5000):  # until every request reached the engine and some still wait
                async with http.get("/metrics") as resp:
                    m = _samples(await resp.text())
                queued = m["foveal_pool_server_requests_waiting"]
                seen = queued + m["foveal_pool_server_requests_running"]
                seen += m["foveal_pool_server_requests_total"]  # finished, any outcome
                if queued >= 2 and seen == 8:
                    break
                await asyncio.sleep(0.005)
            else:
                raise AssertionError("the requests never queued")
            proc.send_signal(signal.SIGTERM)  # with requests running and queued
            done = await asyncio.gather(*inflight)
        assert [status for status, _, _ in done] == [200] * 8  # every one answered
        rest, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "pool t256: drained and stopped" in rest


def test_pool_serve_refuses_an_impossible_tier(checkpoint: Path) -> None:
    proc = _foveal("pool", "serve", "--tier", "t8", "--port", "0", "--checkpoint", str(checkpoint))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "needs a square token budget" in out and "cls-topk and kcenter" in out


# -- the local stack on reference pools -------------------------------------------------------


async def test_stack_on_reference_pools_answers_through_the_router(checkpoint: Path) -> None:
    async with running_stack(
        pool_backend=None,  # the tiers' own backend: reference by default
        local_pools={"checkpoint": str(checkpoint), "max_new_tokens": 4},
    ) as stack:
        assert {p.backend for pools in stack.pools.values() for p in pools} == {"reference"}
        assert {t.backend for t in stack.settings.tiers} == {"reference"}
        async with openai.AsyncOpenAI(
            base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0
        ) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="t16",
                messages=[image_message(QUESTION)],  # type: ignore[list-item]
                logprobs=True,
            )
        resp = raw.parse()
        assert raw.headers["x-foveal-tier"] == "t16"
        tokens = len(stack.pool("t16").pool.model.tokenizer.encode(QUESTION)) + 1  # type: ignore[union-attr]
        assert resp.usage is not None and resp.usage.prompt_tokens == 16 + tokens
        assert resp.choices[0].logprobs is not None


async def test_stack_without_a_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="local_pools.checkpoint"):
        async with running_stack(
            pool_backend="reference", local_pools={"checkpoint": str(tmp_path / "none.pt")}
        ):
            pass


def test_foveal_up_serves_reference_pools(checkpoint: Path, tmp_path: Path) -> None:
    proc = _foveal(
        "up", "--port", "0", "--grpc-port", "0", "--checkpoint", str(checkpoint), cwd=tmp_path
    )
    lines: list[str] = []
    try:
        out = _read_until(proc, "Ctrl-C", lines)
        gateway = re.search(r"(http://127\.0\.0\.1:\d+)/v1", out)
        assert gateway, out
        pools = re.findall(r"reference VLM pool \(foveal-ref, resolution\):\s*(http://\S+)", out)
        assert len(pools) == 5 and "FAKE" not in out, out
        body = json.dumps(_body(model="auto")).encode()
        req = urllib.request.Request(
            f"{gateway.group(1)}/v1/chat/completions",
            data=body,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
            assert resp.status == 200 and resp.headers["x-foveal-tier"].startswith("t")
        assert answer["usage"]["prompt_tokens"] > 1
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + rest


def test_foveal_up_without_a_checkpoint_fails_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "none.pt"
    proc = _foveal(
        "up", "--port", "0", "--grpc-port", "0", "--checkpoint", str(missing), cwd=tmp_path
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "cannot start the local stack" in out and "--pools fake" in out
