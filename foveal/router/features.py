"""Request features for learned routing: cheap enough for the hot path, the same at training time.

One :class:`FeatureExtractor` turns a :class:`ChatRequest` into

- ``vector``: every feature, the input of the sufficiency model (:mod:`foveal.router.sufficiency`);
- ``context``: a compact (``CONTEXT_DIM`` <= 64), roughly unit-scaled summary ending in a constant
  1.0, the context of the bandit policies;
- ``summary``: a JSON-safe digest that goes into the decision record (and Explain).

**Image.** Never a full decode of a large image: the edge already decodes every image once to
validate it (JPEGs in draft mode, scaled down in the decoder) and keeps a ``PREVIEW_SIZE`` square
preview on the :class:`ImagePart` (:func:`preview_image`). Features read that preview; a request
built without the edge (no preview) is decoded here the same way (:func:`decode_preview`), so
both paths give the same pixels. The preview is what the reference pool itself looks at (it
resizes every image to 128 x 128 with a box filter), and its 2x pyramid 128 -> 64 -> 32 -> 16 -> 8
is exactly the resolution of the tiers t256 ... t1: the share of the image's detail lost at each
step is a direct measure of what a tier cannot see. Also: size, aspect, bytes per pixel
(compressed size is a free detail estimate), edge energy, text-likeness (many short high-contrast
strokes on a near-binary image), colour entropy and the dominant colour's share.

**Text.** A signed hashed bag of word 1-2-grams and character 3-grams of the newest user turn
(no model, no torch: the router never imports it), plus length features. Prompts repeat (same
templates, same session), so text features are kept in an LRU cache.

**Session.** The turn index and the tier that answered the session's previous turn.

Bump ``FEATURES_VERSION`` whenever a feature changes meaning: a sufficiency model records the
version it was trained on and refuses to load against another.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import numpy as np
from PIL import Image, ImageFile

from foveal.router.requests import ChatRequest, ImagePart

__all__ = [
    "CONTEXT_DIM",
    "CONTEXT_NAMES",
    "FEATURES_VERSION",
    "FEATURE_GROUPS",
    "FEATURE_NAMES",
    "PREVIEW_SIZE",
    "FeatureExtractor",
    "RequestFeatures",
    "context_from_summary",
    "decode_preview",
    "image_features",
    "preview_image",
    "text_features",
]

FEATURES_VERSION = "f1"
#: Side of the square preview the edge keeps of every image (the reference pool's input size).
PREVIEW_SIZE = 128
#: JPEGs are decoded scaled down so that the result is at least this large (as at the edge).
JPEG_DRAFT_SIZE = (256, 256)
TEXT_HASH_DIM = 256
CONTEXT_TEXT_DIM = 16

IMAGE_FEATURES: tuple[str, ...] = (
    "has_image",
    "n_images",
    "log_width",
    "log_height",
    "log_pixels",
    "log_aspect",
    "log_bytes_per_pixel",
    "is_jpeg",
    "is_png",
    "luma_mean",
    "luma_std",
    "gradient_energy",
    "edge_density",
    "detail_lost_128_64",  # share of the luma variance lost going from t256's view to t64's
    "detail_lost_64_32",
    "detail_lost_32_16",
    "detail_lost_16_8",
    "detail_kept_8",  # share of the variance an 8 x 8 (t1) view still has
    "fine_stroke_density",
    "row_transitions",
    "strokes_per_row",
    "near_binary",
    "text_likeness",
    "colour_entropy",
    "dominant_colour_share",
    "colours_present",
    "saturation",
)
TEXT_FEATURES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "digit_share",
    "question_mark",
    "log_user_turns",
)
SESSION_FEATURES: tuple[str, ...] = ("log_turn", "has_previous_tier", "previous_tier_level")
_DENSE = IMAGE_FEATURES + TEXT_FEATURES + SESSION_FEATURES
FEATURE_NAMES: tuple[str, ...] = _DENSE + tuple(f"text_hash_{i}" for i in range(TEXT_HASH_DIM))
#: Feature names by group (a model may be trained on some groups only).
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "image": IMAGE_FEATURES,
    "text": TEXT_FEATURES + FEATURE_NAMES[len(_DENSE) :],
    "session": SESSION_FEATURES,
}
CONTEXT_NAMES: tuple[str, ...] = (
    _DENSE + tuple(f"text_ctx_{i}" for i in range(CONTEXT_TEXT_DIM)) + ("bias",)
)
CONTEXT_DIM = len(CONTEXT_NAMES)
assert CONTEXT_DIM <= 64

log = logging.getLogger(__name__)

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_WORD = re.compile(r"[a-z0-9]+")
_TIER_NAME = re.compile(r"t(\d+)")


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    vector: np.ndarray  # float64 (len(FEATURE_NAMES),): the sufficiency model's input
    context: np.ndarray  # float64 (CONTEXT_DIM,): the bandits' context, last entry 1.0
    summary: dict[str, Any]  # JSON-safe, for the decision record


# -- image ----------------------------------------------------------------------------------


def preview_image(im: Image.Image) -> Image.Image:
    """The ``PREVIEW_SIZE`` square RGB preview of a decoded image (box filter, like the pool).

    Called by the edge right after its validation decode, and by :func:`decode_preview`.
    """
    out = im
    if out.mode not in ("RGB", "L"):
        out = out.convert("RGB")  # palette, alpha, CMYK, 16-bit: one conversion, as the pool does
    factor = min(out.width, out.height) // PREVIEW_SIZE
    if factor >= 2:
        out = out.reduce(factor)  # integer box reduction: cheap, what BOX would average anyway
    if out.size != (PREVIEW_SIZE, PREVIEW_SIZE):
        out = out.resize((PREVIEW_SIZE, PREVIEW_SIZE), Image.Resampling.BOX)
    if out.mode != "RGB":
        out = out.convert("RGB")
    return out.copy() if out is im else out  # never the caller's image: it gets closed


def decode_preview(data: bytes) -> Image.Image:
    """Encoded image bytes -> the preview, decoding exactly as the edge does (JPEG draft mode)."""
    with Image.open(io.BytesIO(data)) as opened:
        im = cast(ImageFile.ImageFile, opened)
        if im.format in ("JPEG", "MPO"):
            im.draft("RGB", JPEG_DRAFT_SIZE)
        im.load()
        return preview_image(im)


def _payload(data_uri: str) -> bytes:
    head, _, payload = data_uri.partition(",")
    if not head.lower().startswith("data:"):
        raise ValueError("image is not a data URI")
    return base64.b64decode(payload)


def _pixels_features(preview: Image.Image) -> dict[str, float]:
    """Statistics of the preview; a few hundred microseconds for 128 x 128 on one core."""
    rgb8 = np.asarray(preview, dtype=np.uint8)
    luma = (rgb8.astype(np.float32) @ _LUMA) * (1.0 / 255.0)
    var = float(luma.var()) + 1e-6
    dx = np.abs(np.diff(luma, axis=1))
    dy = np.abs(np.diff(luma, axis=0))
    # 2x pyramid: the energy each halving removes (mean squared residual of the 2 x 2 blocks),
    # as a share of the total variance
    lost: list[float] = []
    level = luma
    fine_stroke = 0.0
    while level.shape[0] > 8:
        quad = (level[0::2, 0::2], level[0::2, 1::2], level[1::2, 0::2], level[1::2, 1::2])
        coarse = (quad[0] + quad[1] + quad[2] + quad[3]) * 0.25
        if not lost:  # text: many short, strong strokes are fine detail at full resolution
            fine_stroke = sum(float((np.abs(x - coarse) > 0.12).mean()) for x in quad) / 4
        energy = float(sum((x * x).mean() for x in quad)) / 4 - float((coarse * coarse).mean())
        lost.append(max(0.0, energy) / var)
        level = coarse
    kept_8 = float(level.var()) / var
    # ... on a near-binary image whose rows cross many strokes: a row through a line of text
    # changes from light to dark ~2x per glyph, a row through solid shapes ~2x per shape
    binary = luma > float(luma.mean())
    per_row = np.count_nonzero(binary[:, 1:] != binary[:, :-1], axis=1)
    transitions = float(per_row.sum()) / luma.size
    strokes = float(per_row.sum()) / max(1, int(np.count_nonzero(per_row >= 2)))
    hist = np.bincount(np.minimum((luma * 16).astype(np.int32), 15).ravel(), minlength=16)
    top2 = float(np.sort(hist)[-2:].sum()) / luma.size
    text_likeness = top2**2 * min(1.0, max(0.0, strokes - 2.0) / 8.0)
    r, g, b = rgb8[..., 0], rgb8[..., 1], rgb8[..., 2]
    idx = ((r >> 6).astype(np.int32) << 4) | ((g >> 6).astype(np.int32) << 2) | (b >> 6)
    colours = np.bincount(idx.ravel(), minlength=64) / idx.size  # 4 levels per channel
    nz = colours[colours > 0]
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return {
        "luma_mean": float(luma.mean()),
        "luma_std": math.sqrt(var),
        "gradient_energy": float(dx.mean() + dy.mean()),
        "edge_density": float((dx > 0.2).mean() + (dy > 0.2).mean()) / 2,
        "detail_lost_128_64": lost[0],
        "detail_lost_64_32": lost[1],
        "detail_lost_32_16": lost[2],
        "detail_lost_16_8": lost[3],
        "detail_kept_8": kept_8,
        "fine_stroke_density": fine_stroke,
        "row_transitions": transitions * 4,
        "strokes_per_row": strokes / 16,
        "near_binary": top2,
        "text_likeness": text_likeness,
        "colour_entropy": float(-(nz * np.log(nz)).sum()) / math.log(64),
        "dominant_colour_share": float(colours.max()),
        "colours_present": float(np.count_nonzero(colours > 0.01)) / 64,
        "saturation": float(spread.mean()) / 255.0,
    }


def image_features(part: ImagePart, n_images: int = 1) -> dict[str, float]:
    """The image features of ``part`` (named as in ``IMAGE_FEATURES``), unit-scaled.

    Uses the preview the edge kept; decodes one (draft mode) when the part has none. An image
    that cannot be decoded keeps its header features and zero pixel statistics.
    """
    w, h = max(1, part.width), max(1, part.height)
    out = {
        "has_image": 1.0,
        "n_images": min(n_images, 4) / 4,
        "log_width": math.log2(w) / 12,
        "log_height": math.log2(h) / 12,
        "log_pixels": math.log2(w * h) / 24,
        "log_aspect": math.log2(w / h) / 3,
        "log_bytes_per_pixel": math.log2(max(part.nbytes, 1) / (w * h) + 1e-3) / 4,
        "is_jpeg": float(part.mime == "image/jpeg"),
        "is_png": float(part.mime == "image/png"),
    }
    if part.preview is not None:
        try:
            out.update(_pixels_features(part.preview))
            return out
        except Exception as exc:  # decode again below
            log.debug("image preview unusable: %r", exc)
    try:
        out.update(_pixels_features(decode_preview(_payload(part.data_uri))))
    except Exception as exc:  # a request is never refused for its features
        log.debug("image features without pixels: %r", exc)
    return out


# -- text -----------------------------------------------------------------------------------


def _hash_into(grams: Sequence[str], dim: int) -> np.ndarray:
    """Signed feature hashing (crc32: stable across processes, unlike ``hash``), L2-normalised."""
    v = np.zeros(dim, dtype=np.float64)
    for g in grams:
        hv = zlib.crc32(g.encode("utf-8"))
        v[hv % dim] += 1.0 if hv & 0x80000000 else -1.0
    n = float(np.sqrt(v @ v))
    return v / n if n > 0 else v


def _grams(text: str) -> tuple[list[str], list[str]]:
    words = _WORD.findall(text.lower())
    word_grams = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
    char_grams = [f"#{w[i : i + 3]}" for w in (f" {w} " for w in words) for i in range(len(w) - 2)]
    return word_grams, char_grams


def text_features(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dense, hashed, context hash) of one prompt: lengths, the hashed n-grams (TEXT_HASH_DIM),
    and the same n-grams hashed into CONTEXT_TEXT_DIM buckets for the bandits' context."""
    word_grams, char_grams = _grams(text)
    hashed = _hash_into(word_grams, TEXT_HASH_DIM) + _hash_into(char_grams, TEXT_HASH_DIM)
    norm = float(np.sqrt(hashed @ hashed))
    hashed = hashed / norm if norm > 0 else hashed
    ctx = _hash_into(word_grams, CONTEXT_TEXT_DIM)
    chars = len(text)
    dense = np.array(
        [
            math.log1p(chars) / 7,
            math.log1p(len(_WORD.findall(text))) / 5,
            sum(c.isdigit() for c in text) / chars if chars else 0.0,
            float("?" in text),
        ]
    )
    return dense, hashed, ctx


# -- the extractor --------------------------------------------------------------------------


def _tier_level(tier: str) -> float:
    """log2(visual tokens)/8 for tiers named ``t<k>`` (t1 -> 0, t256 -> 1); 0.5 otherwise."""
    m = _TIER_NAME.fullmatch(tier)
    return min(1.0, math.log2(max(1, int(m.group(1)))) / 8) if m else 0.5


class FeatureExtractor:
    """Features of a request; text features of repeated prompts come from an LRU cache."""

    def __init__(self, text_cache_size: int = 4096) -> None:
        self._text = lru_cache(maxsize=text_cache_size)(self._text_uncached)

    @staticmethod
    def _text_uncached(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dense, hashed, ctx = text_features(text)
        for a in (dense, hashed, ctx):
            a.flags.writeable = False  # shared by every hit of the cache
        return dense, hashed, ctx

    def cache_info(self) -> Any:
        """``functools`` cache statistics of the prompt cache (hits, misses, currsize)."""
        return self._text.cache_info()

    def extract(self, req: ChatRequest, previous_tier: str | None = None) -> RequestFeatures:
        t0 = time.perf_counter()
        images = req.images
        largest = max(images, key=lambda p: p.pixels, default=None)
        if largest is None:
            image = dict.fromkeys(IMAGE_FEATURES, 0.0)
        else:
            image = dict.fromkeys(IMAGE_FEATURES, 0.0) | image_features(largest, len(images))
        users = [m for m in req.messages if m.role == "user"]
        question = users[-1].text if users else ""
        hits = self._text.cache_info().hits
        text_dense, hashed, ctx_text = self._text(question)
        cached = self._text.cache_info().hits > hits
        turn = max(0, req.turn_index)
        session = [
            math.log1p(turn) / 3,
            float(previous_tier is not None),
            _tier_level(previous_tier) if previous_tier is not None else 0.0,
        ]
        dense = np.array(
            [image[k] for k in IMAGE_FEATURES]
            + [*text_dense, math.log1p(len(users)) / 3]
            + session,
            dtype=np.float64,
        )
        vector = np.concatenate([dense, hashed])
        context = np.concatenate([np.clip(dense, -4.0, 4.0), ctx_text, [1.0]])
        summary: dict[str, Any] = {
            "version": FEATURES_VERSION,
            "image": (
                None
                if largest is None
                else {
                    "width": largest.width,
                    "height": largest.height,
                    "mime": largest.mime,
                    **{
                        k: round(image[k], 4)
                        for k in (
                            "detail_lost_128_64",
                            "detail_lost_64_32",
                            "edge_density",
                            "text_likeness",
                            "colour_entropy",
                            "dominant_colour_share",
                        )
                    },
                }
            ),
            "text": {"chars": len(question), "cached": cached},
            "turn": turn,
            "previous_tier": previous_tier,
            "extract_ms": round((time.perf_counter() - t0) * 1000, 3),
        }
        return RequestFeatures(vector=vector, context=context, summary=summary)


def context_from_summary(features: dict[str, Any]) -> np.ndarray | None:
    """The bandit context a decision recorded (``features["context"]``), or None when it is
    missing or has another length (recorded by another features version)."""
    raw = features.get("context")
    if not isinstance(raw, list | tuple) or len(raw) != CONTEXT_DIM:
        return None
    try:
        ctx = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return ctx if np.all(np.isfinite(ctx)) else None
