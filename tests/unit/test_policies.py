from __future__ import annotations

import pytest

from foveal.config import PolicySettings, load_settings
from foveal.pools.catalog import Catalog
from foveal.router.policies import POLICIES, DecisionContext, RulePolicy, make_policy
from foveal.router.requests import ChatRequest, ImagePart, Message, TextPart

CATALOG = Catalog.from_settings(load_settings().tiers)


def _req(
    text: str, *, size: tuple[int, int] | None = (512, 512), model: str = "auto"
) -> ChatRequest:
    parts: list[TextPart | ImagePart] = [TextPart(text)]
    if size is not None:
        parts.append(ImagePart("data:image/png;base64,", "image/png", size[0], size[1], 10))
    return ChatRequest("r1", "t", model, (Message("user", tuple(parts)),), 16)


def _tier(text: str, **kw: object) -> str:
    policy = RulePolicy(PolicySettings())
    return policy.select(DecisionContext(_req(text, **kw), CATALOG)).tier  # type: ignore[arg-type]


def test_pin_wins_over_rules() -> None:
    assert _tier("read the document", model="t1") == "t1"


@pytest.mark.parametrize(
    "prompt",
    [
        "Read the sign",
        "What does the text say?",
        "OCR this",
        "In the chart, which bar is tallest?",
        "what is the invoice total",
    ],
)
def test_reading_prompts_go_to_the_top_tier(prompt: str) -> None:
    assert _tier(prompt) == "t256"


def test_keywords_match_whole_words_only() -> None:
    # "thread" contains "read" but is not a reading request
    assert _tier("what colour is the thread?") == "t1"
    assert _tier("Describe the scene") == "t16"


def test_no_image_goes_lowest_and_small_images_go_low() -> None:
    assert _tier("hello", size=None) == "t1"
    assert _tier("Describe the scene", size=(128, 128)) == "t1"


def test_large_image_goes_one_above_default() -> None:
    assert _tier("Describe the scene", size=(4000, 3000)) == "t64"


def test_configured_tiers_are_respected() -> None:
    policy = RulePolicy(PolicySettings(default_tier="t4", high_tier="t64"))
    ctx = DecisionContext(_req("describe"), CATALOG)
    assert policy.select(ctx).tier == "t4"
    assert policy.select(DecisionContext(_req("read it"), CATALOG)).tier == "t64"


def test_decision_carries_reason_features_and_propensity() -> None:
    d = RulePolicy(PolicySettings()).select(DecisionContext(_req("read it"), CATALOG))
    assert d.policy == "rules" and "read" in d.reason and d.propensity == 1.0
    assert d.features["images"] == 1 and d.features["max_pixels"] == 512 * 512


def test_registry() -> None:
    assert "rules" in POLICIES
    assert isinstance(make_policy(PolicySettings(name="rules")), RulePolicy)
    # the learned policies register themselves on first use; the model is the default
    assert type(make_policy(PolicySettings())).__name__ == "ModelPolicy"
    assert {"model", "linucb", "lints"} <= set(POLICIES)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy(PolicySettings(name="nope"))
