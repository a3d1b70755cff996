"""The Ray Serve runtime end to end: two tiers of a real (small, random) reference VLM as one
Ray Serve application on loopback, driven by the `openai` client and the router's PoolClient.

Ray takes several seconds and about a gigabyte to start, so one application serves the whole
module and is shut down (Ray included) at its end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from foveal.config import PoolClientSettings
from foveal.errors import InvalidRequest
from foveal.pools import Catalog, CatalogHolder, Endpoint, PoolClient, Tier
from foveal.testing.images import image_message, png_data_uri

if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
    if os.environ.get("CI", "").strip().lower() in ("true", "1"):
        pytest.fail("ray[serve] is not installed (CI=true: install the `ray` extra)")
    pytest.skip(
        "ray[serve] is not installed; `pip install -e .[ray]` to run the Ray runtime tests",
        allow_module_level=True,
    )

from foveal.pools.ray_app import RayAutoscaling, RayPoolApp, RayPoolConfig, free_port, parse_tiers

# Ray Serve's own config models use pydantic v1-style Field arguments.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
    # Ray starts a cluster and a replica per tier (each importing torch): ~30 s on an idle
    # 2-core box, minutes when the machine is busy. The per-test default (120 s) is too tight.
    pytest.mark.timeout(900),
]

MODEL = "foveal-ref"
QUESTION = "what colour is the square"
ASK: Any = [image_message(QUESTION)]  # the openai client's message type, loosely


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from foveal.pools.reference.checkpoint import save_checkpoint
    from foveal.pools.reference.model import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ray") / "tiny.pt"
    save_checkpoint(build_model(), path)
    return path


@pytest.fixture(scope="module")
def ray_pools(checkpoint: Path) -> Iterator[RayPoolApp]:
    config = RayPoolConfig(
        tiers=parse_tiers("t1,t16"),
        checkpoint=str(checkpoint),
        model_name=MODEL,
        port=free_port(),
        max_new_tokens=6,
        autoscaling=RayAutoscaling(min_replicas=1, max_replicas=2, num_cpus=0.25),
    )
    app = RayPoolApp(config, num_cpus=2)
    app.start()
    try:
        yield app
    finally:
        app.stop()
    import ray

    # Clean shutdown: Ray is gone and nothing listens on the application's port any more.
    assert not ray.is_initialized()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", config.port), 1):
        pass


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_openai_client_on_two_tiers(ray_pools: RayPoolApp) -> None:
    from openai import OpenAI

    usage: dict[str, int] = {}
    for tier, base in ray_pools.endpoints().items():
        with OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0) as client:
            answer = client.chat.completions.create(
                model=MODEL,
                messages=ASK,
                max_tokens=4,
                logprobs=True,
            )
            assert answer.model == MODEL
            assert answer.usage is not None and answer.usage.completion_tokens <= 4
            usage[tier] = answer.usage.prompt_tokens
            (choice,) = answer.choices
            assert choice.logprobs is not None and choice.logprobs.content is not None
            assert len(choice.logprobs.content) == answer.usage.completion_tokens
            assert all(t.logprob <= 0 for t in choice.logprobs.content)
    # Same prompt, different tier: the prompt differs by exactly the visual tokens.
    assert usage["t16"] - usage["t1"] == 16 - 1


def test_openai_client_streams_through_ray(ray_pools: RayPoolApp) -> None:
    from openai import OpenAI

    base = ray_pools.endpoints()["t16"]
    with OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0) as client:
        plain = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=5,
        )
        stream = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, finish = "", None, None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
    assert plain.choices[0].message.content == text  # greedy: the same answer either way
    assert finish == plain.choices[0].finish_reason
    assert usage is not None and plain.usage is not None
    assert usage.prompt_tokens == plain.usage.prompt_tokens


@pytest.fixture
async def pool_client(ray_pools: RayPoolApp) -> AsyncIterator[PoolClient]:
    tiers = tuple(
        Tier(name, int(name[1:]), float(name[1:]), "reference", MODEL, (Endpoint(url, MODEL),))
        for name, url in ray_pools.endpoints().items()
    )
    settings = PoolClientSettings(health_interval_s=60.0, request_timeout_s=60.0)
    async with PoolClient(CatalogHolder(Catalog(tiers)), settings) as client:
        yield client


def deadline() -> float:
    return time.monotonic() + 60.0


async def test_router_pool_client_uses_tier_base_urls(
    ray_pools: RayPoolApp, pool_client: PoolClient
) -> None:
    await pool_client.check_health()  # GET <base>/health of every endpoint
    assert pool_client.available("t1") == pool_client.available("t16") == 1
    payload: dict[str, Any] = {"messages": [image_message(QUESTION)], "max_tokens": 3}
    one = await pool_client.complete(["t1"], payload, deadline=deadline())
    sixteen = await pool_client.complete(["t16"], payload, deadline=deadline())
    assert one.endpoint == ray_pools.endpoints()["t1"] and one.tier == "t1"
    assert sixteen.body["usage"]["prompt_tokens"] - one.body["usage"]["prompt_tokens"] == 15
    # "stream": false takes the ingress's streaming relay; the answer is the same JSON
    relayed = await pool_client.complete(["t16"], {**payload, "stream": False}, deadline=deadline())
    assert relayed.body["choices"] == sixteen.body["choices"]
    streamed = await pool_client.stream(
        ["t16"], {**payload, "stream": True, "logprobs": True}, deadline=deadline()
    )
    async with streamed:
        chunks = [c async for c in streamed]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == sixteen.body["choices"][0]["message"]["content"]


async def test_pool_errors_come_through_unchanged(pool_client: PoolClient) -> None:
    two_images = {
        "messages": [
            image_message(QUESTION),
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": png_data_uri()}}],
            },
        ]
    }
    with pytest.raises(InvalidRequest, match="exactly one image per request, got 2"):
        await pool_client.complete(["t16"], two_images, deadline=deadline())
    assert pool_client.available("t16") == 1  # a bad request says nothing against the pool


def test_health_models_metrics_per_tier_and_unknown_tiers(ray_pools: RayPoolApp) -> None:
    for tier, base in ray_pools.endpoints().items():
        assert get(base + "/health")[0] == 200
        status, body = get(base + "/v1/models")
        assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == [MODEL]
        status, body = get(base + "/metrics")
        tokens = int(tier[1:])
        assert status == 200
        assert f'foveal_pool_server_visual_tokens{{tier="{tier}"}} {float(tokens)}' in body.decode()
    status, body = get(ray_pools.url + "/t64/health")
    assert (
        status == 404
        and "no tier 't64' here; this application serves /t1, /t16"
        in (json.loads(body)["error"]["message"])
    )
    assert get(ray_pools.url + "/health")[0] == 200
    status, body = get(ray_pools.url + "/")
    assert json.loads(body) == {"tiers": {"t1": "/t1", "t16": "/t16"}}
