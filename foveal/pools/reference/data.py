"""Batches for the reference VLM: images as tensors and left-padded `question SEP answer EOS`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from foveal.pools.reference.tokenizer import EOS, PAD, SEP, Tokenizer


def image_tensor(images: Sequence[Image.Image], size: int) -> Tensor:
    """(B, 3, size, size) float tensor in [0, 1]; other sizes are resized (box filter)."""
    arrs = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BOX)
        arrs.append(np.asarray(im, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div_(255.0)


def text_batch(
    tokenizer: Tokenizer, questions: Sequence[str], answers: Sequence[str], max_text: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(text, valid, targets): targets[t] is text[t+1] on answer/EOS positions, -100 elsewhere."""
    seqs, starts = [], []
    for q, a in zip(questions, answers, strict=True):
        qi = tokenizer.encode(q)[: max_text - 16] + [SEP]
        ai = (tokenizer.encode(a) + [EOS])[: max_text - len(qi)]
        seqs.append(qi + ai)
        starts.append(len(qi))
    t = max(len(s) for s in seqs)
    text = torch.full((len(seqs), t), PAD, dtype=torch.long)
    targets = torch.full((len(seqs), t), -100, dtype=torch.long)
    for r, (s, q_len) in enumerate(zip(seqs, starts, strict=True)):
        off = t - len(s)
        text[r, off:] = torch.tensor(s)
        # position p predicts token p+1; answers start at index off + q_len
        targets[r, off + q_len - 1 : t - 1] = torch.tensor(s[q_len:])
    return text, text != PAD, targets


def grid_targets(
    items: Sequence[Sequence[tuple[float, float, int]] | None], grid: int, image_size: int
) -> Tensor:
    """(B, grid, grid) class maps: each (x, y, class) item marks the token its pixel falls in,
    other tokens get 0; rows given as None are ignored (-100)."""
    out = torch.full((len(items), grid, grid), -100, dtype=torch.long)
    for r, row in enumerate(items):
        if row is None:
            continue
        out[r] = 0
        for x, y, cls in row:
            gx, gy = grid_cell(x, y, grid, image_size)
            out[r, gy, gx] = cls
    return out


def grid_cell(x: float, y: float, grid: int, image_size: int) -> tuple[int, int]:
    """(column, row) of the `grid` x `grid` token that pixel (x, y) of the image falls in."""
    scale = grid / image_size
    return min(grid - 1, max(0, int(x * scale))), min(grid - 1, max(0, int(y * scale)))


def glyph_targets(
    positions: Sequence[Sequence[tuple[str, float, float]] | None],
    grid: int,
    image_size: int,
    classes: str,
) -> Tensor:
    """Glyph classes on the token grid: 1 + index in `classes` where a glyph's centre falls."""
    items = [
        None
        if glyphs is None
        else [(x, y, classes.find(ch.upper()) + 1) for ch, x, y in glyphs if ch.upper() in classes]
        for glyphs in positions
    ]
    return grid_targets(items, grid, image_size)
