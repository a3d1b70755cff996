"""The suite's on-disk format: one JSONL file per split, images as PNG files or data URIs.

Format reference: docs/dataset-format.md. `read_dataset` also reads external datasets written in
the same format, so they can be evaluated by the same code.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from PIL import Image

from foveal.bench.suite.families import Sample, generate_suite

SPLITS: tuple[str, ...] = ("train", "validation", "test")
#: Base seed of each split; a dataset seed s (0 <= s < SPLIT_STRIDE) gives split seed base + s,
#: so the three splits draw from disjoint seed ranges and never share a sample.
SPLIT_STRIDE = 1_000_000
SPLIT_SEEDS: dict[str, int] = {"train": 0, "validation": SPLIT_STRIDE, "test": 2 * SPLIT_STRIDE}

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_DATA_URI = re.compile(r"data:image/(png|jpeg|webp|gif);base64,(.*)", re.DOTALL)
_REQUIRED: tuple[str, ...] = ("id", "family", "question", "answer", "image")


def normalise_answer(answer: str) -> str:
    """The form answers are compared in: trimmed, inner whitespace collapsed, upper-case, and
    one trailing full stop dropped ("  top  left. " -> "TOP LEFT")."""
    s = " ".join(str(answer).split()).upper()
    return s[:-1].rstrip() if s.endswith(".") else s


def answers_match(predicted: str, reference: str) -> bool:
    """Exact match after `normalise_answer` on both sides."""
    return normalise_answer(predicted) == normalise_answer(reference)


@dataclass(frozen=True)
class DatasetRow:
    """One row read back: `image_ref` is a path relative to the JSONL file's folder or a data URI;
    the image itself is decoded lazily (`image`), its encoded bytes via `image_bytes`."""

    id: str
    split: str
    family: str
    question: str
    answer: str
    params: dict[str, Any]
    image_ref: str
    base_dir: Path = field(repr=False)

    @cached_property
    def image_bytes(self) -> bytes:
        m = _DATA_URI.fullmatch(self.image_ref)
        if m:
            return base64.b64decode(m.group(2))
        return (self.base_dir / self.image_ref).read_bytes()

    @cached_property
    def image(self) -> Image.Image:
        with Image.open(io.BytesIO(self.image_bytes)) as im:
            return im.convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_data_uri(image: Image.Image) -> str:
    """`image` as an inline PNG data URI, as the pools and the router take it."""
    return png_data_uri(encode_png(image))


def write_dataset(
    samples: Iterable[Sample], out_dir: Path, *, split: str, embed: bool = False
) -> Path:
    """Write `out_dir/<split>.jsonl`, images to `out_dir/images/<id>.png` (or inline data URIs
    with `embed=True`). Returns the JSONL path. Ids must be unique and file-name safe."""
    if not _ID.fullmatch(split):
        raise ValueError(f"split name {split!r} is not file-name safe")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{split}.jsonl"
    seen: set[str] = set()
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            if not _ID.fullmatch(s.id):
                raise ValueError(f"sample id {s.id!r} is not file-name safe")
            if s.id in seen:
                raise ValueError(f"duplicate sample id {s.id!r}")
            seen.add(s.id)
            png = encode_png(s.image)
            if embed:
                ref = png_data_uri(png)
            else:
                (out_dir / "images").mkdir(exist_ok=True)
                (out_dir / "images" / f"{s.id}.png").write_bytes(png)
                ref = f"images/{s.id}.png"
            row = {
                "id": s.id,
                "split": split,
                "family": s.family,
                "question": s.question,
                "answer": s.answer,
                "params": s.params,
                "image": ref,
            }
            f.write(json.dumps(row, separators=(",", ":"), sort_keys=False) + "\n")
    return path


def _parse_row(obj: Any, base_dir: Path, default_split: str) -> DatasetRow:
    if not isinstance(obj, dict):
        raise ValueError("row is not a JSON object")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    for k in ("id", "family", "question", "answer", "image"):
        if not isinstance(obj[k], str) or not obj[k]:
            raise ValueError(f"field {k!r} must be a non-empty string")
    params = obj.get("params", {})
    if not isinstance(params, dict):
        raise ValueError("field 'params' must be an object")
    split = obj.get("split", default_split)
    if not isinstance(split, str):
        raise ValueError("field 'split' must be a string")
    ref = obj["image"]
    m = _DATA_URI.fullmatch(ref)
    if m:
        try:
            base64.b64decode(m.group(2), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"image data URI is not valid base64 ({e})") from None
    elif ref.startswith("data:"):
        raise ValueError("image data URI must be data:image/<png|jpeg|webp|gif>;base64,...")
    else:
        rel = Path(ref)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"image path {ref!r} must be relative to the JSONL file's folder")
        if not (base_dir / rel).is_file():
            raise ValueError(f"image file {ref!r} not found under {base_dir}")
    return DatasetRow(
        obj["id"], split, obj["family"], obj["question"], obj["answer"], params, ref, base_dir
    )


def read_dataset(path: Path) -> Iterator[DatasetRow]:
    """Rows of a JSONL dataset file (blank lines skipped). A malformed row raises ValueError
    naming the file and its 1-based line number."""
    path = Path(path)
    base_dir = path.parent
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield _parse_row(json.loads(line), base_dir, path.stem)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None


def _fingerprint(s: Sample) -> str:
    h = hashlib.sha256(s.image.tobytes())
    h.update(s.question.encode())
    return h.hexdigest()


def write_splits(
    out_dir: Path,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    size: int = 128,
    embed: bool = False,
) -> dict[str, Path]:
    """Generate and write the train/validation/test splits under `out_dir`.

    Split k uses seed SPLIT_SEEDS[k] + seed; on top of the disjoint seeds, any sample whose
    image and question already appeared in an earlier split is skipped (and replaced), so no
    split shares a sample with another.
    """
    if not 0 <= seed < SPLIT_STRIDE:
        raise ValueError(f"seed must be in [0, {SPLIT_STRIDE}), got {seed}")
    seen: set[str] = set()
    paths: dict[str, Path] = {}
    for split, n in zip(SPLITS, (n_train, n_val, n_test), strict=True):
        if n < 0:
            raise ValueError(f"sample count for {split} must be >= 0, got {n}")

        def fresh(split: str = split, n: int = n) -> Iterator[Sample]:
            kept = 0
            for s in generate_suite(2 * n + 16, seed=SPLIT_SEEDS[split] + seed, size=size):
                if kept == n:
                    return
                fp = _fingerprint(s)
                if fp in seen:
                    continue
                seen.add(fp)
                kept += 1
                yield s
            raise RuntimeError(f"could not draw {n} distinct samples for {split}")

        paths[split] = write_dataset(fresh(), out_dir, split=split, embed=embed)
    return paths
