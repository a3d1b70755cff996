"""Training-free visual-token compressors, applied after the full-resolution encoder.

Each takes the encoder's patch tokens ``(B, N, D)`` laid out row-major on a square grid and keeps
``k`` of them (or ``k`` averages), in spatial (row-major) order, deterministically:

- :func:`grid_pool` — average pooling of the grid down to ``sqrt(k) x sqrt(k)`` cells;
- :func:`cls_topk` — the ``k`` tokens the [CLS] query attends to most (FasterVLM);
- :func:`kcenter` — greedy k-center (farthest-point) selection on normalised token features,
  seeded with the most [CLS]-attended token: a diverse cover of the image (ToDRE, stage 1).

Resolution tiers (``resolution``) are not a compressor: the image is downscaled before the
encoder so it emits ``k`` tokens and both encoder and decoder get cheaper.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MECHANISMS: tuple[str, ...] = ("resolution", "pool", "cls-topk", "kcenter")


def square_side(k: int) -> int:
    """`sqrt(k)` for a perfect square `k`; a clear error otherwise (grid mechanisms need it)."""
    side = math.isqrt(k)
    if k < 1 or side * side != k:
        raise ValueError(f"this mechanism needs a square token budget (1, 4, 16, ...), got {k}")
    return side


def check_budget(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"token budget must be between 1 and {n}, got {k}")


def grid_pool(tokens: Tensor, k: int) -> Tensor:
    """Average-pool the square token grid to ``sqrt(k) x sqrt(k)`` tokens (row-major)."""
    b, n, d = tokens.shape
    check_budget(k, n)
    grid, side = square_side(n), square_side(k)
    x = tokens.transpose(1, 2).reshape(b, d, grid, grid)
    return F.adaptive_avg_pool2d(x, side).flatten(2).transpose(1, 2)


def _gather(tokens: Tensor, index: Tensor) -> Tensor:
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def cls_topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the `k` highest [CLS]-attention scores per row, sorted (spatial order kept).

    Ties break towards the lower index, so the selection is deterministic.
    """
    check_budget(k, scores.shape[1])
    # A tiny index-dependent tie-breaker keeps torch.topk deterministic on equal scores.
    n = scores.shape[1]
    bias = torch.arange(n, dtype=scores.dtype, device=scores.device) * (-1e-9)
    top = torch.topk(scores + bias, k, dim=1, sorted=False).indices
    return top.sort(dim=1).values


def cls_topk(tokens: Tensor, scores: Tensor, k: int) -> Tensor:
    return _gather(tokens, cls_topk_indices(scores, k))


def kcenter_indices(tokens: Tensor, k: int, first: Tensor) -> Tensor:
    """Greedy farthest-point selection of `k` tokens, starting at `first` (B,), sorted."""
    b, n, _ = tokens.shape
    check_budget(k, n)
    feats = F.normalize(tokens.float(), dim=-1)
    chosen = torch.empty(b, k, dtype=torch.long, device=tokens.device)
    chosen[:, 0] = first
    rows = torch.arange(b, device=tokens.device)
    dist = torch.cdist(feats, feats[rows, first].unsqueeze(1)).squeeze(-1)  # (B, N)
    for i in range(1, k):
        dist[rows, chosen[:, i - 1]] = -1.0  # never pick a chosen token again
        nxt = dist.argmax(dim=1)
        chosen[:, i] = nxt
        new = torch.cdist(feats, feats[rows, nxt].unsqueeze(1)).squeeze(-1)
        dist = torch.minimum(dist, new)
    return chosen.sort(dim=1).values


def kcenter(tokens: Tensor, scores: Tensor, k: int) -> Tensor:
    return _gather(tokens, kcenter_indices(tokens, k, scores.argmax(dim=1)))


def compress(tokens: Tensor, scores: Tensor, k: int, mechanism: str) -> Tensor:
    """Apply `mechanism` (pool, cls-topk, kcenter) to full-resolution tokens."""
    if k == tokens.shape[1]:
        return tokens
    if mechanism == "pool":
        return grid_pool(tokens, k)
    if mechanism == "cls-topk":
        return cls_topk(tokens, scores, k)
    if mechanism == "kcenter":
        return kcenter(tokens, scores, k)
    raise ValueError(f"unknown compression mechanism {mechanism!r}; expected one of {MECHANISMS}")
