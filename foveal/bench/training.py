"""Training and evaluation of the reference VLM on the synthetic visual-QA suite.

The schedule is fixed by the seed and step count, so `foveal vlm train` reproduces the shipped
checkpoint. Two phases:

1. *warm-up* (``warmup_frac`` of the steps): cheap tiers only (k <= 64), easier half of each
   family, reading families oversampled at k = 64 — glyphs are learnt where they are still
   legible and a step costs a fraction of a full-resolution one;
2. *main*: every tier and mechanism, full difficulty range, with the token budget drawn per batch
   (one set of weights serves every tier) and more of the budget spent on reading families and
   high tiers, where the learning is.

A run is resumable: a checkpoint (weights, optimizer, step, RNG) is saved every
``save_every`` steps and picked up again when the same output path is given.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foveal.bench.suite import (
    COLOUR_NAMES,
    FAMILIES,
    SHAPES,
    Sample,
    generate,
    generate_suite,
    normalise_answer,
)
from foveal.bench.suite.families import (
    DOC_FIELDS,
    chart_layout,
    object_positions,
    reading_layout,
)
from foveal.pools.reference.checkpoint import load_checkpoint, save_checkpoint
from foveal.pools.reference.compress import MECHANISMS, square_side
from foveal.pools.reference.data import grid_cell, grid_targets, image_tensor, text_batch
from foveal.pools.reference.model import (
    AUX_HEADS,
    GLYPHS,
    ReferenceVLM,
    VLMConfig,
    build_model,
)

TIERS: tuple[int, ...] = (1, 4, 16, 64, 256)
READING = ("ocr", "document")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 9000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.2
    seed: int = 0
    threads: int = 2
    #: bfloat16 autocast for the forward pass (weights and optimizer stay fp32); on CPUs with
    #: native bf16 matmuls a full-resolution step is ~1.5x faster (608 vs 947 ms here)
    bf16: bool = True
    save_every: int = 250
    #: sampling weight of each family in a batch
    family_weights: dict[str, float] = field(
        default_factory=lambda: {
            "colour": 1.0,
            "existence": 1.0,
            "counting": 1.5,
            "position": 1.5,
            "ocr": 3.0,
            "document": 3.0,
            "chart": 1.5,
        }
    )
    #: sampling weight of each token budget in the main phase
    tier_weights: dict[int, float] = field(
        default_factory=lambda: {1: 1.0, 4: 1.0, 16: 1.5, 64: 2.5, 256: 3.0}
    )
    #: sampling weight of each mechanism for k below the full grid
    mechanism_weights: dict[str, float] = field(
        default_factory=lambda: {"resolution": 6.0, "pool": 2.0, "cls-topk": 1.0, "kcenter": 1.0}
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Batch:
    k: int
    mechanism: str
    samples: list[Sample]


def _choice(rng: random.Random, weights: dict[Any, float]) -> Any:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def schedule(cfg: TrainConfig, step: int) -> tuple[int, str, float, dict[str, float]]:
    """(k, mechanism, max difficulty, family weights) of `step`; pure in (cfg, step)."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    if step < cfg.warmup_frac * cfg.steps:
        k = rng.choice((1, 4, 16, 64, 64, 64))
        fams = dict(cfg.family_weights)
        if k < 64:  # reading is illegible there: spend the cheap steps on general families
            fams = {f: w for f, w in fams.items() if f not in READING}
        return k, "resolution", 0.5, fams
    k = _choice(rng, cfg.tier_weights)
    mech = "resolution" if k == TIERS[-1] else _choice(rng, cfg.mechanism_weights)
    return k, mech, 1.0, dict(cfg.family_weights)


def batches(cfg: TrainConfig, start: int = 0) -> Iterator[Batch]:
    """The deterministic stream of training batches from `start` (samples from the train seed)."""
    for step in range(start, cfg.steps):
        k, mech, max_d, fams = schedule(cfg, step)
        rng = np.random.default_rng([cfg.seed, 7, step])
        names = list(fams)
        p = np.array([fams[n] for n in names])
        picks = rng.choice(len(names), size=cfg.batch_size, p=p / p.sum())
        samples = [
            generate(names[i], rng, difficulty=float(rng.uniform(0.0, max_d))) for i in picks
        ]
        yield Batch(k, mech, samples)


def lr_at(cfg: TrainConfig, step: int) -> float:
    warm = 100
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def train_step(
    model: ReferenceVLM,
    opt: torch.optim.Optimizer,
    batch: Batch,
    lr: float,
    bf16: bool = False,
) -> float:
    s = batch.samples
    images = image_tensor([x.image for x in s], model.config.image_size)
    text, valid, targets = text_batch(
        model.tokenizer, [x.question for x in s], [x.answer for x in s], model.config.max_text
    )
    for group in opt.param_groups:
        group["lr"] = lr
    c = model.config
    grid = square_side(batch.k) if batch.mechanism == "resolution" else c.grid
    dense = dense_targets(s, grid, c.image_size)
    pointers = None
    side = square_side(batch.k)
    if batch.mechanism in SPATIAL and side >= 2:
        pointers = pointer_targets(s, targets, model.tokenizer, side, c.image_size)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model.loss(
            images, text, valid, targets, batch.k, batch.mechanism, dense, pointers=pointers
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def _object_class(shape: str, colour: str) -> int:
    return 1 + SHAPES.index(shape) * len(COLOUR_NAMES) + COLOUR_NAMES.index(colour)


def _cell_class(x: float, y: float, third: float) -> int:
    """1 + the index (row-major, as the suite's GRID_CELLS) of the 3x3 image cell of (x, y)."""
    return 1 + 3 * min(2, int(y // third)) + min(2, int(x // third))


def dense_targets(samples: Sequence[Sample], grid: int, image_size: int) -> dict[str, Any]:
    """Auxiliary class maps on the encoder's grid (see model.AUX_HEADS) for a batch.

    Text (and chart labels) is only placed on grids of 8x8 and finer (coarser ones cannot
    separate glyphs); scene objects and bars from 4x4 up. Samples without that kind of content
    are ignored (-100).
    """
    maps: dict[str, list[Any]] = {name: [] for name in AUX_HEADS}
    third = image_size / 3
    for x in samples:
        bars = chart_layout(x) if grid >= 4 else []
        maps["bar"].append(
            [(bx, y, rank) for _, bx, ly, my, rank in bars for y in (ly, my)] if bars else None
        )
        layout = reading_layout(x) if grid >= 8 and x.family in READING else None
        if layout is None:
            labels = [(bx, ly, GLYPHS.find(lb) + 1) for lb, bx, ly, _, _ in bars]
            maps["glyph"].append(labels if labels and grid >= 8 else None)
            maps["order"].append(None)
            maps["group"].append(None)
        else:
            maps["glyph"].append([(gx, gy, GLYPHS.find(ch) + 1) for ch, gx, gy, _, _ in layout])
            maps["order"].append([(gx, gy, i + 1) for _, gx, gy, i, _ in layout if 0 <= i < 8])
            maps["group"].append([(gx, gy, g + 1) for _, gx, gy, _, g in layout])
        objects = object_positions(x) if grid >= 4 else []
        per_shape = {sh: sum(o[0] == sh for o in objects) for sh in SHAPES}
        top = AUX_HEADS["count"] - 1
        for name, items in (
            ("object", [(ox, oy, _object_class(sh, col)) for sh, col, ox, oy in objects]),
            ("count", [(ox, oy, min(top, per_shape[sh])) for sh, _, ox, oy in objects]),
            ("cell", [(ox, oy, _cell_class(ox, oy, third)) for *_, ox, oy in objects]),
        ):
            maps[name].append(items or None)
        right = None
        if x.params.get("variant") == "left_of" and len(objects) >= 2:
            (_, _, lx, ly), (rs, rc, _, _) = objects[0], objects[1]  # generator order: left, right
            right = [(lx, ly, _object_class(rs, rc))]
        maps["right"].append(right)
    return {name: grid_targets(rows, grid, image_size) for name, rows in maps.items()}


#: Mechanisms whose k tokens keep the image's layout as a sqrt(k) x sqrt(k) grid.
SPATIAL = ("resolution", "pool")


def evidence(sample: Sample) -> list[list[tuple[float, float]]] | None:
    """Per answer character group, the pixels holding the evidence for it, or None.

    Reading families: one list per character of the answer (that character's glyph in the
    asked string). Scene and chart families: one list shared by the whole answer (the object
    asked about, the objects to count, the bar to name). Colour and "no" answers: None.
    """
    p = sample.params
    if sample.family in READING:
        group = 0 if sample.family == "ocr" else 1 + DOC_FIELDS.index(p["field"])
        glyphs = {i: (x, y) for _, x, y, i, g in reading_layout(sample) if g == group and i >= 0}
        if sorted(glyphs) != list(range(len(sample.answer))):
            return None
        return [[glyphs[i]] for i in range(len(sample.answer))]
    objects = object_positions(sample)
    if sample.family == "position" and objects:
        return [[objects[0][2:]]]  # the object asked about ("where") or the answer ("left of")
    if sample.family in ("existence", "counting") and sample.answer != "no":
        found = [(x, y) for sh, _, x, y in objects if sh == p["shape"]]
        return [found] if found else None
    if sample.family == "chart":
        return [[(x, y) for label, x, y, _, _ in chart_layout(sample) if label == sample.answer]]
    return None


def pointer_targets(
    samples: Sequence[Sample], targets: Any, tokenizer: Any, grid: int, image_size: int
) -> Any:
    """(B, T, grid*grid) bool: for each text position predicting an answer token, the tokens
    of a `grid` x `grid` visual grid that hold its evidence (see :func:`evidence`)."""
    b, t = targets.shape
    out = torch.zeros(b, t, grid * grid, dtype=torch.bool)
    for r, x in enumerate(samples):
        ev = evidence(x)
        if ev is None:
            continue
        n_tok = len(tokenizer.encode(x.answer))
        if len(ev) > 1 and len(ev) != n_tok:
            continue  # a reading answer that tokenised into words: no per-character pointer
        rows = (targets[r] != -100).nonzero().flatten()[:n_tok]
        for j, pos in enumerate(rows.tolist()):
            for px, py in ev[j if len(ev) > 1 else 0]:
                gx, gy = grid_cell(px, py, grid, image_size)
                out[r, pos, gy * grid + gx] = True
    return out


def make_optimizer(model: ReferenceVLM, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "emb" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )


def train(
    cfg: TrainConfig,
    out: Path,
    *,
    model_config: VLMConfig | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> ReferenceVLM:
    """Train (or resume) into `out`; calls `progress(step, steps, loss)` after every step."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    resume = out.with_suffix(".resume.pt")
    model = build_model(model_config)
    opt = make_optimizer(model, cfg)
    start = 0
    if resume.exists():
        state = torch.load(resume, map_location="cpu", weights_only=False)
        if state["train_config"] != cfg.to_dict():
            raise ValueError(f"{resume} belongs to a run with other settings; delete it to restart")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    ema = None
    for step, batch in enumerate(batches(cfg, start), start=start):
        loss = train_step(model, opt, batch, lr_at(cfg, step), bf16=cfg.bf16)
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        if progress:
            progress(step + 1, cfg.steps, ema)
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            tmp = resume.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step + 1,
                    "train_config": cfg.to_dict(),
                },
                tmp,
            )
            tmp.replace(resume)
    save_checkpoint(model, out, train_config=cfg.to_dict())
    resume.unlink(missing_ok=True)
    return model


# -- evaluation -------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Exact-match accuracy per (family, k, mechanism)."""

    correct: dict[tuple[str, int, str], int] = field(default_factory=dict)
    total: dict[tuple[str, int, str], int] = field(default_factory=dict)

    def add(self, family: str, k: int, mech: str, ok: bool) -> None:
        key = (family, k, mech)
        self.correct[key] = self.correct.get(key, 0) + int(ok)
        self.total[key] = self.total.get(key, 0) + 1

    def accuracy(self, family: str | None, k: int, mech: str) -> float:
        keys = [x for x in self.total if x[1] == k and x[2] == mech and family in (None, x[0])]
        n = sum(self.total[x] for x in keys)
        return sum(self.correct[x] for x in keys) / n if n else float("nan")


def evaluate(
    model: ReferenceVLM,
    samples: Sequence[Any],
    tiers: Sequence[int] = TIERS,
    mechanisms: Sequence[str] = ("resolution",),
    batch_size: int = 64,
) -> EvalResult:
    """Greedy exact match (after :func:`normalise_answer`) of `samples` at every tier."""
    model.eval()
    res = EvalResult()
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        images = image_tensor([s.image for s in chunk], model.config.image_size)
        for mech in mechanisms:
            for k in tiers:
                if mech != "resolution" and k == model.config.max_tokens:
                    continue
                gens = model.generate(images, [s.question for s in chunk], k, mech)
                for s, g in zip(chunk, gens, strict=True):
                    res.add(
                        s.family, k, mech, normalise_answer(g.text) == normalise_answer(s.answer)
                    )
    return res


def heldout(n_per_family: int, seed: int) -> list[Sample]:
    return list(generate_suite(n_per_family * len(FAMILIES), seed=seed))


def format_table(res: EvalResult, tiers: Sequence[int] = TIERS, mech: str = "resolution") -> str:
    fams = sorted({f for f, _, m in res.total if m == mech}, key=FAMILIES.index)
    head = f"{'family':<10}" + "".join(f"{'t' + str(k):>7}" for k in tiers)
    rows = [head]
    for f in [*fams, None]:
        cells = "".join(f"{100 * res.accuracy(f, k, mech):>6.1f}%" for k in tiers)
        rows.append(f"{f or 'overall':<10}{cells}")
    return "\n".join(rows)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


__all__ = [
    "MECHANISMS",
    "TIERS",
    "EvalResult",
    "TrainConfig",
    "batches",
    "evaluate",
    "format_table",
    "heldout",
    "load_checkpoint",
    "schedule",
    "train",
]
