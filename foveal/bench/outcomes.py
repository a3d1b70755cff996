"""`foveal bench outcomes`: what the reference VLM answers at every tier, as training data.

The sufficiency model (:mod:`foveal.router.sufficiency`) learns P(correct | request, tier) from
logged outcomes. Before any traffic exists, this command makes them: it runs the reference VLM
in-process on a split of the visual-QA suite (or on any dataset in the suite's format) at every
resolution tier and writes one JSONL row per (sample, tier)::

    {"id", "split", "family", "question", "answer", "params", "image",
     "tier", "visual_tokens", "prediction", "correct", "checkpoint"}

``image`` follows the dataset format (docs/dataset-format.md): a path relative to the JSONL
file's folder (``images/<id>.png``, written once per sample) or, with ``embed``, a data URI.
The image bytes are exactly what a client would send, so the router's features can be computed
from them on the same code path as at request time. ``correct`` is exact match after
:func:`~foveal.bench.suite.dataset.normalise_answer`, as in ``foveal bench tiers``.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from foveal.bench.suite import FAMILIES, SPLIT_SEEDS, generate_suite, read_dataset
from foveal.bench.suite.dataset import answers_match, encode_png
from foveal.pools.reference.checkpoint import SHIPPED, file_sha256, load_checkpoint
from foveal.pools.reference.data import image_tensor

__all__ = ["OutcomeSample", "run_outcomes", "samples_for"]

DEFAULT_TIERS: tuple[str, ...] = ("t1", "t4", "t16", "t64", "t256")
_MIME_EXT = {b"\x89PNG": ("image/png", "png"), b"\xff\xd8\xff": ("image/jpeg", "jpg")}


@dataclass(frozen=True)
class OutcomeSample:
    """One question to ask at every tier: the encoded image bytes as a client would send them."""

    id: str
    split: str
    family: str
    question: str
    answer: str
    params: dict[str, Any]
    image: bytes


def _kind(data: bytes) -> tuple[str, str]:
    for magic, kind in _MIME_EXT.items():
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", "webp"
    if data[:4] == b"GIF8":
        return "image/gif", "gif"
    raise ValueError("image is not PNG, JPEG, WEBP or GIF")


def samples_for(
    split: str, per_family: int, *, dataset: Path | None = None, seed: int = 0
) -> Iterator[OutcomeSample]:
    """The suite's `split` (per_family samples of each family, PNG-encoded), or every row of a
    dataset file in the suite's format."""
    if dataset is not None:
        for row in read_dataset(dataset):
            yield OutcomeSample(
                row.id, row.split, row.family, row.question, row.answer, row.params, row.image_bytes
            )
        return
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_SEEDS)}")
    for s in generate_suite(per_family * len(FAMILIES), seed=SPLIT_SEEDS[split] + seed):
        yield OutcomeSample(
            s.id, split, s.family, s.question, s.answer, s.params, encode_png(s.image)
        )


def _tier_tokens(tiers: Sequence[str], max_tokens: int) -> dict[str, int]:
    out = {}
    for t in tiers:
        if not (t.startswith("t") and t[1:].isdigit()):
            raise ValueError(f"tier {t!r} is not a reference tier name (t<visual tokens>)")
        k = int(t[1:])
        if k < 1 or k > max_tokens or int(k**0.5) ** 2 != k:
            raise ValueError(f"tier {t!r}: visual tokens must be a square in [1, {max_tokens}]")
        out[t] = k
    return out


def run_outcomes(
    out: Path,
    samples: Sequence[OutcomeSample],
    *,
    tiers: Sequence[str] = DEFAULT_TIERS,
    checkpoint: Path | None = None,
    embed: bool = False,
    batch_size: int = 64,
    threads: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Ask every sample at every tier; write the rows to `out`. Returns a summary (rows,
    accuracy per family x tier, seconds)."""
    torch.set_num_threads(threads)
    path = checkpoint or SHIPPED
    model = load_checkpoint(path)
    ks = _tier_tokens(tiers, model.config.max_tokens)
    ckpt = file_sha256(path)[:16]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    images_dir = out.parent / "images"
    t0 = time.perf_counter()
    correct: dict[tuple[str, str], list[int]] = {}
    rows = 0
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f, torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            refs = [_image_ref(s, images_dir, embed) for s in chunk]
            pil = [_open(s.image) for s in chunk]
            images = image_tensor(pil, model.config.image_size)
            questions = [s.question for s in chunk]
            for tier, k in ks.items():
                gens = model.generate(images, questions, k, "resolution")
                for s, ref, g in zip(chunk, refs, gens, strict=True):
                    ok = answers_match(g.text, s.answer)
                    correct.setdefault((s.family, tier), [0, 0])
                    correct[(s.family, tier)][0] += int(ok)
                    correct[(s.family, tier)][1] += 1
                    row = {
                        "id": s.id,
                        "split": s.split,
                        "family": s.family,
                        "question": s.question,
                        "answer": s.answer,
                        "params": s.params,
                        "image": ref,
                        "tier": tier,
                        "visual_tokens": k,
                        "prediction": g.text,
                        "correct": ok,
                        "checkpoint": ckpt,
                    }
                    f.write(json.dumps(row, separators=(",", ":")) + "\n")
                    rows += 1
            if progress:
                progress(min(start + batch_size, len(samples)), len(samples))
    tmp.replace(out)
    return {
        "out": str(out),
        "rows": rows,
        "samples": len(samples),
        "tiers": list(ks),
        "checkpoint": ckpt,
        "seconds": round(time.perf_counter() - t0, 1),
        "accuracy": {
            f"{fam}/{tier}": round(c / n, 4) for (fam, tier), (c, n) in sorted(correct.items())
        },
    }


def _open(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")


def _image_ref(s: OutcomeSample, images_dir: Path, embed: bool) -> str:
    mime, ext = _kind(s.image)
    if embed:
        return f"data:{mime};base64,{base64.b64encode(s.image).decode('ascii')}"
    images_dir.mkdir(parents=True, exist_ok=True)
    name = f"{s.id}.{ext}"
    (images_dir / name).write_bytes(s.image)
    return f"images/{name}"
