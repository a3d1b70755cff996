"""Request features: cheap decodes, meaningful image statistics, the prompt cache, the context."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from foveal.bench.suite import generate_suite
from foveal.bench.suite.dataset import encode_png
from foveal.config import LimitsSettings
from foveal.router import features as F
from foveal.router.features import (
    CONTEXT_DIM,
    FEATURE_NAMES,
    FeatureExtractor,
    context_from_summary,
    decode_preview,
    image_features,
)
from foveal.router.images import image_from_bytes
from foveal.router.requests import ChatRequest, ImagePart, Message, TextPart

LIMITS = LimitsSettings()


def _jpeg(size: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 64, size // 64, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)
    ImageDraw.Draw(im).text((size // 8, size // 8), "HELLO 42", fill=(0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _request(parts: tuple[Any, ...], *more: Message) -> ChatRequest:
    return ChatRequest("r1", "acme", "auto", (*more, Message("user", parts)), 16)


def _part(data: bytes) -> ImagePart:
    return image_from_bytes(data, LIMITS, param="image")


def _index(name: str) -> int:
    return FEATURE_NAMES.index(name)


@pytest.fixture
def decoded_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The size of every decoded image the preview is made from (edge and features paths)."""
    sizes: list[tuple[int, int]] = []
    real = F.preview_image

    def spy(im: Image.Image) -> Image.Image:
        sizes.append(im.size)
        return real(im)

    monkeypatch.setattr(F, "preview_image", spy)
    monkeypatch.setattr("foveal.router.images.preview_image", spy)
    return sizes


def test_large_jpeg_is_never_decoded_at_full_size(decoded_sizes: list[tuple[int, int]]) -> None:
    data = _jpeg(4096)
    part = _part(data)  # the edge: draft-mode decode, preview kept
    assert (part.width, part.height) == (4096, 4096)
    assert part.preview is not None and part.preview.size == (F.PREVIEW_SIZE, F.PREVIEW_SIZE)
    decode_preview(data)  # the features' own path, for requests built without the edge
    assert len(decoded_sizes) == 2
    assert all(max(s) <= 512 for s in decoded_sizes), decoded_sizes  # 1/8 scale in the decoder


def test_features_reuse_the_edge_preview(decoded_sizes: list[tuple[int, int]]) -> None:
    part = _part(_jpeg(1024))
    decoded_sizes.clear()
    FeatureExtractor().extract(_request((part, TextPart("what is written here?"))))
    assert decoded_sizes == []  # nothing decoded again
    cold = dataclasses.replace(part, preview=None)
    FeatureExtractor().extract(_request((cold, TextPart("what is written here?"))))
    assert len(decoded_sizes) == 1 and max(decoded_sizes[0]) <= 256


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_edge_and_cold_decode_give_the_same_features(kind: str) -> None:
    if kind == "jpeg":
        data = _jpeg(1024)
    else:
        data = encode_png(next(iter(generate_suite(5, seed=3))).image)
    part = _part(data)
    cold = dataclasses.replace(part, preview=None)
    assert part.preview is not None
    assert np.array_equal(np.asarray(part.preview), np.asarray(decode_preview(data)))
    fx = FeatureExtractor()
    a = fx.extract(_request((part, TextPart("how many circles?")))).vector
    b = fx.extract(_request((cold, TextPart("how many circles?")))).vector
    assert np.array_equal(a, b)


def test_text_images_score_higher_text_likeness_than_shapes() -> None:
    scores: dict[str, list[float]] = {}
    for s in generate_suite(7 * 12, seed=11):
        f = image_features(_part(encode_png(s.image)))
        scores.setdefault(s.family, []).append(f["text_likeness"])
    reading = scores["ocr"] + scores["document"]
    shapes = scores["colour"] + scores["existence"] + scores["counting"] + scores["position"]
    assert min(np.median(scores["ocr"]), np.median(scores["document"])) > 3 * max(
        np.median(scores[f]) for f in ("colour", "existence", "counting", "position")
    )
    # most reading images out-score most shape images, one by one
    pairs = [(r > s) for r in reading for s in shapes]
    assert np.mean(pairs) > 0.9


def test_text_rendered_by_pillow_is_text_like() -> None:
    page = Image.new("RGB", (512, 512), "white")
    draw = ImageDraw.Draw(page)
    for i in range(12):
        draw.text((20, 20 + 38 * i), f"INVOICE {i:03d} TOTAL 4,512.00 EUR", fill="black")
    shapes = Image.new("RGB", (512, 512), "white")
    sd = ImageDraw.Draw(shapes)
    sd.ellipse((40, 40, 220, 220), fill=(200, 30, 30))
    sd.rectangle((260, 260, 470, 470), fill=(30, 30, 200))
    text_f = image_features(_part(encode_png(page)))
    shape_f = image_features(_part(encode_png(shapes)))
    assert text_f["text_likeness"] > 0.3 > 0.05 > shape_f["text_likeness"]
    assert text_f["detail_lost_128_64"] > shape_f["detail_lost_128_64"]
    assert shape_f["saturation"] > text_f["saturation"]


def test_detail_lost_tracks_fine_structure() -> None:
    rng = np.random.default_rng(0)
    fine = Image.fromarray(rng.integers(0, 2, (128, 128), dtype=np.uint8) * 255).convert("RGB")
    coarse = fine.resize((8, 8), Image.Resampling.BOX).resize((128, 128), Image.Resampling.NEAREST)
    f_fine = image_features(_part(encode_png(fine)))
    f_coarse = image_features(_part(encode_png(coarse)))
    assert f_fine["detail_lost_128_64"] > 0.5
    assert f_coarse["detail_lost_128_64"] < 0.01  # an 8x8 image loses nothing above 8 px
    assert f_coarse["detail_kept_8"] > 0.99


def test_size_aspect_and_format_features() -> None:
    wide = Image.new("RGB", (800, 200), (10, 200, 10))
    buf = io.BytesIO()
    wide.save(buf, format="JPEG")
    f = image_features(_part(buf.getvalue()))
    assert f["is_jpeg"] == 1.0 and f["is_png"] == 0.0
    assert f["log_aspect"] == pytest.approx(np.log2(4) / 3)
    assert f["log_pixels"] == pytest.approx(np.log2(800 * 200) / 24)


def test_vector_context_and_summary_shapes() -> None:
    part = _part(_jpeg(1024))
    f = FeatureExtractor().extract(_request((part, TextPart("Read the sign."))), "t64")
    assert f.vector.shape == (len(FEATURE_NAMES),) and f.vector.dtype == np.float64
    assert f.context.shape == (CONTEXT_DIM,) and CONTEXT_DIM <= 64
    assert f.context[-1] == 1.0
    assert np.all(np.isfinite(f.vector)) and np.all(np.abs(f.context) <= 4.0)
    json.dumps(f.summary)  # JSON-safe
    assert f.summary["image"]["width"] == 1024 and f.summary["previous_tier"] == "t64"
    assert f.vector[_index("has_previous_tier")] == 1.0
    assert f.vector[_index("previous_tier_level")] == pytest.approx(6 / 8)


def test_session_features_follow_the_conversation() -> None:
    part = _part(_jpeg(256))
    earlier = (
        Message("user", (TextPart("hi"),)),
        Message("assistant", (TextPart("hello"),)),
    )
    first = FeatureExtractor().extract(_request((part, TextPart("and now?"))))
    later = FeatureExtractor().extract(_request((part, TextPart("and now?")), *earlier), "t256")
    assert first.vector[_index("log_turn")] == 0.0 and later.vector[_index("log_turn")] > 0
    assert later.vector[_index("previous_tier_level")] == 1.0
    assert later.summary["turn"] == 1


def test_request_without_image() -> None:
    f = FeatureExtractor().extract(_request((TextPart("Tell me a joke"),)))
    assert f.vector[_index("has_image")] == 0.0 and f.summary["image"] is None


def test_undecodable_preview_does_not_fail_the_request() -> None:
    part = ImagePart(
        "data:image/png;base64," + base64.b64encode(b"not a png").decode(), "image/png", 640, 480, 9
    )
    f = FeatureExtractor().extract(_request((part, TextPart("what?"))))
    assert f.vector[_index("has_image")] == 1.0
    assert f.vector[_index("text_likeness")] == 0.0
    assert f.vector[_index("log_width")] == pytest.approx(np.log2(640) / 12)


def test_repeated_prompts_hit_the_cache() -> None:
    fx = FeatureExtractor(text_cache_size=2)
    part = _part(_jpeg(256))
    a = fx.extract(_request((part, TextPart("what colour is the car?"))))
    b = fx.extract(_request((part, TextPart("what colour is the car?"))))
    assert (a.summary["text"]["cached"], b.summary["text"]["cached"]) == (False, True)
    assert fx.cache_info().hits == 1 and fx.cache_info().misses == 1
    assert np.array_equal(a.vector, b.vector)
    fx.extract(_request((part, TextPart("one"))))
    fx.extract(_request((part, TextPart("two"))))
    c = fx.extract(_request((part, TextPart("what colour is the car?"))))  # evicted (size 2)
    assert c.summary["text"]["cached"] is False


def test_prompts_differ_in_their_hashed_text() -> None:
    fx = FeatureExtractor()
    part = _part(_jpeg(256))
    a = fx.extract(_request((part, TextPart("What colour is the square?")))).vector
    b = fx.extract(_request((part, TextPart("What does the sign say?")))).vector
    c = fx.extract(_request((part, TextPart("what COLOUR is the square")))).vector
    hashed = slice(len(FEATURE_NAMES) - F.TEXT_HASH_DIM, None)
    assert not np.allclose(a[hashed], b[hashed])
    assert np.allclose(a[hashed], c[hashed])  # case and punctuation do not matter
    assert np.linalg.norm(a[hashed]) == pytest.approx(1.0)


def test_text_hashing_is_stable_across_processes() -> None:
    code = (
        "import json; from foveal.router.features import text_features as t; "
        "print(json.dumps(t('How many red circles are there?')[1].tolist()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    here = F.text_features("How many red circles are there?")[1]
    assert np.array_equal(np.array(json.loads(out)), here)


def test_context_from_summary() -> None:
    f = FeatureExtractor().extract(_request((_part(_jpeg(256)), TextPart("q?"))))
    recorded = {"context": np.round(f.context, 4).tolist()}
    ctx = context_from_summary(json.loads(json.dumps(recorded)))
    assert ctx is not None and np.allclose(ctx, f.context, atol=1e-4)
    assert context_from_summary({}) is None
    assert context_from_summary({"context": [1.0, 2.0]}) is None  # another features version
    assert context_from_summary({"context": "nope"}) is None
    assert context_from_summary({"context": ["x"] * CONTEXT_DIM}) is None
