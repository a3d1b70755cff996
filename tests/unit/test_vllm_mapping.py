"""The tier -> vLLM mapping: server arguments, the router's catalog entries, and the round trip."""

from __future__ import annotations

import json
import math
import re
import shlex
from typing import Any

import pytest

from foveal.api.crds import ModelPoolSpec
from foveal.config import Settings
from foveal.operator import manifests
from foveal.pools import Catalog
from foveal.pools.vllm import (
    PIXELS_PER_TOKEN,
    QWEN_MIN_PIXELS,
    REFERENCE_TIERS,
    VllmMappingError,
    VllmTier,
    catalog_entry,
    catalog_from_commands,
    from_model_pool,
    parse_serve_args,
    reference_vllm_tiers,
    serve_args,
    shell_command,
)

QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def qwen_resize(h: int, w: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's ``smart_resize`` (transformers ``image_processing_qwen2_vl``), which vLLM
    runs on every image: sides become multiples of 28 and the area lands in [min, max]."""
    f = 28
    hb, wb = max(f, round(h / f) * f), max(f, round(w / f) * f)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(f, math.floor(h / beta / f) * f), max(f, math.floor(w / beta / f) * f)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
    return hb, wb


def test_reference_tiers_are_the_routers_tiers() -> None:
    tiers = reference_vllm_tiers(QWEN)
    default = {t.name: t.visual_tokens for t in Settings().tiers}
    assert {t.name: t.visual_tokens for t in tiers} == default == REFERENCE_TIERS


@pytest.mark.parametrize(("name", "tokens"), list(REFERENCE_TIERS.items()))
def test_pixels_follow_the_tier_budget(name: str, tokens: int) -> None:
    (tier,) = [t for t in reference_vllm_tiers(QWEN) if t.name == name]
    argv = serve_args(tier)
    assert argv[:3] == ["vllm", "serve", QWEN]
    kwargs = json.loads(flag(argv, "--mm-processor-kwargs"))
    assert kwargs["max_pixels"] == tokens * 28 * 28
    # the floor never exceeds the cap: t1 lowers Qwen's default 4-token floor to one token
    assert kwargs["min_pixels"] == min(tokens, 4) * 28 * 28
    assert json.loads(flag(argv, "--limit-mm-per-prompt")) == {"image": 1}
    assert flag(argv, "--served-model-name") == QWEN
    assert flag(argv, "--port") == "8000"
    assert "--host" not in argv


@pytest.mark.parametrize("tokens", list(REFERENCE_TIERS.values()))
@pytest.mark.parametrize("size", [(12, 12), (64, 64), (480, 640), (1080, 1920), (4000, 3000)])
def test_a_tier_never_spends_more_than_its_budget(tokens: int, size: tuple[int, int]) -> None:
    tier = VllmTier(name=f"t{tokens}", visual_tokens=tokens, model=QWEN)
    kw = tier.processor_kwargs
    h, w = qwen_resize(*size, kw["min_pixels"], kw["max_pixels"])
    used = h * w // PIXELS_PER_TOKEN
    assert 1 <= used <= tokens
    # ...and a large image uses most of it (the tier is a real budget, not just a cap)
    if min(size) >= 480:
        assert used >= tokens // 2


def test_without_the_lowered_floor_t1_would_spend_four_tokens() -> None:
    # Qwen's default floor blows a small image up to 4 tokens on a 1-token tier: this is why
    # the mapping sets min_pixels itself
    h, w = qwen_resize(20, 20, QWEN_MIN_PIXELS, 1 * PIXELS_PER_TOKEN)
    assert h * w // PIXELS_PER_TOKEN == 4
    kw = VllmTier(name="t1", visual_tokens=1, model=QWEN).processor_kwargs
    h, w = qwen_resize(20, 20, kw["min_pixels"], kw["max_pixels"])
    assert h * w // PIXELS_PER_TOKEN == 1


def full_tier() -> VllmTier:
    return VllmTier(
        name="ocr_hi",
        visual_tokens=1024,
        model="/models/qwen-vl",
        served_model_name="qwen-vl-ocr",
        port=8100,
        host="0.0.0.0",
        max_pixels=1003520,
        min_pixels=200704,
        limit_mm_per_prompt=4,
        mm_processor_kwargs={"fps": 1},
        extra_args=("--max-model-len", "8192", "--enforce-eager"),
    )


@pytest.mark.parametrize("tier", [*reference_vllm_tiers(QWEN), full_tier()], ids=str)
def test_serve_args_round_trip(tier: VllmTier) -> None:
    tokens = None if tier.max_pixels is None else tier.visual_tokens
    assert parse_serve_args(serve_args(tier), name=tier.name, visual_tokens=tokens) == tier
    again = parse_serve_args(shell_command(tier), name=tier.name, visual_tokens=tokens)
    assert again == tier
    assert shlex.split(shell_command(tier)) == serve_args(tier)


def test_overrides_reach_the_command() -> None:
    argv = serve_args(full_tier())
    assert flag(argv, "--host") == "0.0.0.0" and flag(argv, "--port") == "8100"
    assert flag(argv, "--served-model-name") == "qwen-vl-ocr"
    assert json.loads(flag(argv, "--mm-processor-kwargs")) == {
        "max_pixels": 1003520,
        "min_pixels": 200704,
        "fps": 1,
    }
    assert json.loads(flag(argv, "--limit-mm-per-prompt")) == {"image": 4}
    assert argv[-3:] == ["--max-model-len", "8192", "--enforce-eager"]


def test_parse_reads_the_equals_form_the_legacy_limit_and_repeats() -> None:
    cmd = (
        "vllm serve Qwen/Qwen2-VL-2B-Instruct --port=9000 --limit-mm-per-prompt image=2,video=0 "
        "--mm-processor-kwargs='{\"max_pixels\": 50176}' --max-model-len 4096 "
        "--mm-processor-kwargs '{\"max_pixels\": 784}'"
    )
    tier = parse_serve_args(cmd, name="t64")
    assert (tier.visual_tokens, tier.port, tier.limit_mm_per_prompt) == (64, 9000, 2)
    assert tier.served_name == "Qwen/Qwen2-VL-2B-Instruct"
    assert tier.effective_min_pixels == QWEN_MIN_PIXELS
    # vLLM keeps the last value of a repeated flag: the repeat stays, after the mapping's own
    assert tier.extra_args == (
        "--max-model-len",
        "4096",
        "--mm-processor-kwargs",
        '{"max_pixels": 784}',
    )


def test_catalog_entries_are_valid_router_settings() -> None:
    urls = {t.name: [f"http://vllm-{t.name}.gpu.svc:8000/"] for t in reference_vllm_tiers(QWEN)}
    entries = [catalog_entry(t, urls[t.name]) for t in reference_vllm_tiers(QWEN)]
    settings = Settings(tiers=entries)
    catalog = Catalog.from_settings(settings.tiers)
    assert catalog.names == ["t1", "t4", "t16", "t64", "t256"]
    t16 = catalog.get("t16")
    assert t16 is not None
    assert (t16.backend, t16.model, t16.visual_tokens, t16.cost_weight) == ("vllm", QWEN, 16, 16.0)
    assert [(e.url, e.model) for e in t16.endpoints] == [("http://vllm-t16.gpu.svc:8000", QWEN)]
    custom = catalog_entry(full_tier(), ["http://10.0.0.7:8100"], cost_weight=3.5)
    assert (custom.name, custom.model, custom.cost_weight) == ("ocr_hi", "qwen-vl-ocr", 3.5)


def test_catalog_from_running_commands() -> None:
    cmd = shell_command(VllmTier(name="t4", visual_tokens=4, model=QWEN, served_model_name="q"))
    (entry,) = catalog_from_commands({"t4": (cmd, ["http://127.0.0.1:8001"])})
    assert (entry.name, entry.visual_tokens, entry.model) == ("t4", 4, "q")
    assert entry.endpoints[0].url == "http://127.0.0.1:8001"


def pool_spec(**over: Any) -> ModelPoolSpec:
    base = {"tier": "t64", "visualTokens": 64, "backend": "vllm", "image": "vllm/vllm-openai"}
    return ModelPoolSpec.model_validate({**base, "model": QWEN, **over})


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"tier": "t1", "visualTokens": 1, "port": 8080},
        {"backendArgs": {"maxPixels": 1003520, "limitMmPerPrompt": 2, "extraArgs": ["--x"]}},
    ],
)
def test_the_operator_runs_the_same_server_but_for_the_floor(over: dict[str, Any]) -> None:
    """The operator's command equals the mapping's, except that the mapping also sets
    ``min_pixels`` (the operator leaves Qwen's 4-token floor, which breaks t1)."""
    spec = pool_spec(**over)
    ours = serve_args(from_model_pool(spec))
    theirs = manifests.container_command(spec)
    i = ours.index("--mm-processor-kwargs") + 1
    kwargs = json.loads(ours[i])
    assert kwargs.pop("min_pixels") == min(QWEN_MIN_PIXELS, spec.effective_max_pixels)
    operator_kwargs = json.loads(theirs[i])
    operator_kwargs.pop("min_pixels", None)
    assert operator_kwargs == kwargs
    assert ours[:i] + ours[i + 1 :] == theirs[:i] + theirs[i + 1 :]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "t 16"}, "tier name 't 16'"),
        ({"name": "auto"}, "tier name 'auto' is reserved"),
        ({"visual_tokens": 0}, "visual_tokens 0: must be at least 1"),
        ({"visual_tokens": True}, "visual_tokens True: must be an integer"),
        ({"visual_tokens": "16"}, "visual_tokens '16': must be an integer"),
        ({"model": " "}, "model ' '"),
        ({"served_model_name": ""}, "served_model_name"),
        ({"port": 0}, "port 0: must be in 1..65535"),
        ({"max_pixels": -1}, "max_pixels -1"),
        ({"min_pixels": 20000}, "min_pixels (20000) is above max_pixels (12544)"),
        ({"limit_mm_per_prompt": 0}, "limit_mm_per_prompt 0"),
        ({"mm_processor_kwargs": {"max_pixels": 1}}, "mm_processor_kwargs: set max_pixels"),
    ],
)
def test_bad_tiers_are_refused_with_the_field_named(fields: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"name": "t16", "visual_tokens": 16, "model": QWEN}
    with pytest.raises(VllmMappingError, match="^" + re.escape(message)):
        VllmTier(**{**base, **fields})


GOOD = "vllm serve m --mm-processor-kwargs '{\"max_pixels\": 3136}'"


@pytest.mark.parametrize(
    ("cmd", "message"),
    [
        ("python -m vllm m", "expected a command starting with `vllm serve`"),
        ("vllm serve --port 1", "names no model"),
        ("vllm serve m", "no --mm-processor-kwargs"),
        ("vllm serve m --mm-processor-kwargs '{\"fps\": 1}'", "has no max_pixels"),
        ("vllm serve m --mm-processor-kwargs max_pixels=3136", "is not JSON"),
        ("vllm serve m --mm-processor-kwargs '[1]'", "must be a JSON object"),
        ('vllm serve m --mm-processor-kwargs \'{"max_pixels": "big"}\'', "max_pixels 'big'"),
        ("vllm serve m --mm-processor-kwargs '{\"max_pixels\": 1000}'", "not a whole number"),
        (GOOD + " --limit-mm-per-prompt image", "expected JSON like"),
        (GOOD + " --limit-mm-per-prompt '{\"video\": 1}'", "needs a positive image count"),
        (GOOD + " --port", "--port has no value"),
        (GOOD + " --port eighty", "--port 'eighty'"),
        (GOOD + " --served-model-name a b", "several names"),
    ],
)
def test_bad_commands_are_refused_with_the_problem_named(cmd: str, message: str) -> None:
    with pytest.raises(VllmMappingError, match=re.escape(message)):
        parse_serve_args(cmd, name="t4")


@pytest.mark.parametrize(
    ("url", "message"),
    [("localhost:8000", "expected a base URL"), ("http://h:8000/v1", "without /v1")],
)
def test_bad_endpoints_are_refused(url: str, message: str) -> None:
    tier = VllmTier(name="t4", visual_tokens=4, model=QWEN)
    with pytest.raises(VllmMappingError, match=re.escape(message)):
        catalog_entry(tier, [url])
