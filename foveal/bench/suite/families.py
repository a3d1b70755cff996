"""The task families: each draws one (image, question, answer) sample from a seeded generator.

Every family takes a `difficulty` in [0, 1] (0 = easiest) that moves a concrete knob inside the
family (object size, distractors, text height, bar-height gap...). The concrete values land in
`Sample.params` (JSON-serialisable) next to the difficulty itself, so benchmarks can slice by them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from foveal.bench.suite.render import (
    COLOUR_NAMES,
    INK,
    PALETTE,
    SHAPES,
    draw_objects,
    draw_text,
    fit_cap_height,
    glyph_centres,
    lerp,
    new_canvas,
    scatter,
    text_extent,
)

#: OCR alphabet: A-Z and digits minus the letters O and I (indistinguishable from 0 and 1).
OCR_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
GRID_CELLS: tuple[str, ...] = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)
BAR_LABELS = "ABCDE"
DOC_FIELDS: tuple[str, ...] = ("NAME", "DATE", "TOTAL", "ID", "REF", "CODE", "QTY", "TAX")
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
_DIGITS = "0123456789"


@dataclass(frozen=True)
class Sample:
    """One generated task: the image plus its question, reference answer and parameters."""

    id: str
    family: str
    question: str
    answer: str
    params: dict[str, Any] = field(hash=False)
    image: Image.Image = field(hash=False, compare=False, repr=False)


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _others(items: Sequence[str], exclude: str) -> list[str]:
    return [i for i in items if i != exclude]


def _radius(size: int, easy: float, hard: float, d: float) -> int:
    return max(2, round(lerp(easy, hard, d) * size))


# -- families ---------------------------------------------------------------------------------


def _colour(rng: np.random.Generator, size: int, d: float) -> tuple[Image.Image, str, str, dict]:
    target = _pick(rng, COLOUR_NAMES)
    others = _others(COLOUR_NAMES, target)
    n_distract = 1 + round(lerp(0, 5, d))
    small = _radius(size, 0.09, 0.06, d)
    if rng.random() < 0.5:  # the whole image in the colour, a few small objects on top
        image = new_canvas(size, PALETTE[target])
        specs = [(_pick(rng, SHAPES), _pick(rng, others), small) for _ in range(n_distract)]
        objects = scatter(rng, specs, size)
        question, variant = "What is the dominant colour of the image?", "background"
    else:  # one big shape on a neutral background, small distractors around it
        image = new_canvas(size)
        shape = _pick(rng, SHAPES)
        big = _radius(size, 0.42, 0.34, d)
        objects = scatter(rng, [(shape, target, big)], size)
        objects += scatter(
            rng,
            [(_pick(rng, SHAPES), _pick(rng, others), small) for _ in range(n_distract)],
            size,
            objects,
        )
        question, variant = f"What colour is the big {shape}?", "shape"
    draw_objects(image, objects)
    return (
        image,
        question,
        target,
        {"variant": variant, "distractors": n_distract, "objects": [o.as_param() for o in objects]},
    )


def _scene_with_distractors(
    rng: np.random.Generator, size: int, specs: list, shape: str, r: int, n_distract: int
) -> tuple[Image.Image, list]:
    """Add ``n_distract`` objects of other shapes, place everything in random order, draw."""
    specs = specs + [
        (_pick(rng, _others(SHAPES, shape)), _pick(rng, COLOUR_NAMES), r) for _ in range(n_distract)
    ]
    objects = scatter(rng, [specs[i] for i in rng.permutation(len(specs))], size)
    image = new_canvas(size)
    draw_objects(image, objects)
    return image, objects


def _existence(rng: np.random.Generator, size: int, d: float) -> tuple[Image.Image, str, str, dict]:
    shape = _pick(rng, SHAPES)
    present = bool(rng.random() < 0.5)
    r = _radius(size, 0.14, 0.035, d)
    n_distract = 1 + round(lerp(0, 4, d))
    specs = [(shape, _pick(rng, COLOUR_NAMES), r)] if present else []
    image, objects = _scene_with_distractors(rng, size, specs, shape, r, n_distract)
    return (
        image,
        f"Is there a {shape}?",
        "yes" if present else "no",
        {
            "shape": shape,
            "radius": r,
            "distractors": n_distract,
            "objects": [o.as_param() for o in objects],
        },
    )


def _counting(rng: np.random.Generator, size: int, d: float) -> tuple[Image.Image, str, str, dict]:
    shape = _pick(rng, SHAPES)
    count = int(rng.integers(1, 7))
    r = _radius(size, 0.10, 0.035, d)
    n_distract = round(lerp(0, 4, d))
    specs = [(shape, _pick(rng, COLOUR_NAMES), r) for _ in range(count)]
    image, objects = _scene_with_distractors(rng, size, specs, shape, r, n_distract)
    return (
        image,
        f"How many {shape}s are there?",
        str(count),
        {
            "shape": shape,
            "count": count,
            "radius": r,
            "distractors": n_distract,
            "objects": [o.as_param() for o in objects],
        },
    )


def _cell_region(size: int, cell: int) -> tuple[float, float, float, float]:
    third = size / 3
    row, col = divmod(cell, 3)
    pad = size * 0.02
    return col * third + pad, row * third + pad, (col + 1) * third - pad, (row + 1) * third - pad


def _position(rng: np.random.Generator, size: int, d: float) -> tuple[Image.Image, str, str, dict]:
    r = _radius(size, 0.12, 0.035, d)
    n_distract = round(lerp(1, 4, d))
    combos = [(s, c) for s in SHAPES for c in COLOUR_NAMES]
    chosen = [combos[i] for i in rng.choice(len(combos), size=n_distract + 2, replace=False)]
    if rng.random() < 0.6:  # "Where is the X?" -> 3x3 grid cell of X
        cell = int(rng.integers(9))
        shape, colour = chosen[0]
        objects = scatter(rng, [(shape, colour, r)], size, region=_cell_region(size, cell))
        objects += scatter(rng, [(s, c, r) for s, c in chosen[2:]], size, objects)
        question, answer = f"Where is the {colour} {shape}?", GRID_CELLS[cell]
        extra: dict[str, Any] = {"variant": "where", "cell": answer}
    else:  # "What is left of X?" -> the one object in X's row band, in a column left of X
        row = int(rng.integers(3))
        col_left = int(rng.integers(2))
        col_right = int(rng.integers(col_left + 1, 3))
        (ls, lc), (rs, rc) = chosen[0], chosen[1]
        objects = scatter(rng, [(ls, lc, r)], size, region=_cell_region(size, row * 3 + col_left))
        objects += scatter(
            rng, [(rs, rc, r)], size, objects, region=_cell_region(size, row * 3 + col_right)
        )
        bands = [b for b in range(3) if b != row]
        for s, c in chosen[2:]:  # distractors only in the other row bands: no ambiguity
            b = bands[int(rng.integers(2))]
            band = (1.0, _cell_region(size, b * 3)[1], size - 1.0, _cell_region(size, b * 3)[3])
            objects += scatter(rng, [(s, c, r)], size, objects, region=band)
        question, answer = f"What is left of the {rc} {rs}?", f"{lc} {ls}"
        extra = {"variant": "left_of", "row": row}
    image = new_canvas(size)
    draw_objects(image, objects)
    return (
        image,
        question,
        answer,
        {
            "radius": r,
            "distractors": n_distract,
            **extra,
            "objects": [o.as_param() for o in objects],
        },
    )


def _ocr(rng: np.random.Generator, size: int, d: float) -> tuple[Image.Image, str, str, dict]:
    text = "".join(_pick(rng, OCR_ALPHABET) for _ in range(int(rng.integers(3, 5))))
    wanted = max(4, round(lerp(40, 12, d) * size / 128))
    cap = fit_cap_height([text], wanted, size - 8)
    left, top, right, bottom = text_extent(text, cap)
    w, h = right - left, bottom - top
    x = int(rng.integers(4, max(5, size - w - 3)))
    y = int(rng.integers(4, max(5, size - h - 3)))
    image = new_canvas(size)
    box = draw_text(image, text, x, y, cap, INK)
    return image, "What word is written?", text, {"text_height": cap, "bbox": list(box)}


def _doc_value(rng: np.random.Generator, name: str) -> str:
    def chars(alphabet: str, n: int) -> str:
        return "".join(_pick(rng, alphabet) for _ in range(n))

    if name == "NAME":
        return chars(_LETTERS, int(rng.integers(4, 7)))
    if name == "DATE":
        return f"{int(rng.integers(1, 29)):02d}{_pick(rng, _MONTHS)}"
    if name in ("TOTAL", "CODE"):
        return chars(_DIGITS, int(rng.integers(3, 6)))
    if name in ("QTY", "TAX"):
        return chars(_DIGITS, int(rng.integers(2, 4)))
    return chars(_LETTERS, 1) + chars(_LETTERS + _DIGITS, int(rng.integers(2, 5)))  # ID, REF


_DOC_X = 5


def _doc_layout(size: int, n_lines: int) -> tuple[int, float]:
    """(top of the first line, distance between lines) of a document page."""
    top = round(size * 0.12)
    return top, (size - top - 4) / n_lines


def glyph_positions(sample: Sample) -> list[tuple[str, float, float]]:
    """(character, centre x, centre y) in pixels of every glyph a reading sample draws.

    Recomputed from the sample's params with the generator's own layout, so it matches the
    pixels; empty for families without text. The reference VLM uses it as an auxiliary
    training signal (which character sits under which visual token).
    """
    return [(ch, x, y) for ch, x, y, _, _ in reading_layout(sample)]


def reading_layout(sample: Sample) -> list[tuple[str, float, float, int, int]]:
    """Every glyph as (character, x, y, index, group).

    `index` is the character's position in the string a question can ask for (the OCR word,
    a document field's value), -1 for other text (field names, colons); `group` is 0 for the
    OCR word and 1 + the field's index in :data:`DOC_FIELDS` for a document line.
    """
    p = sample.params
    if sample.family == "ocr":
        x0, y0, _, _ = p["bbox"]
        glyphs = glyph_centres(sample.answer, x0, y0, p["text_height"])
        return [(ch, x, y, i, 0) for i, (ch, x, y) in enumerate(glyphs)]
    if sample.family == "document":
        top, gap = _doc_layout(p["size"], p["lines"])
        out: list[tuple[str, float, float, int, int]] = []
        for i, (name, value) in enumerate(p["fields"].items()):
            line = f"{name}: {value}"
            glyphs = glyph_centres(line, _DOC_X, round(top + i * gap), p["text_height"])
            first = len(glyphs) - len(value)  # the value's glyphs end the line
            group = 1 + DOC_FIELDS.index(name)
            out += [
                (ch, x, y, j - first if j >= first else -1, group)
                for j, (ch, x, y) in enumerate(glyphs)
            ]
        return out
    return []


def object_positions(sample: Sample) -> list[tuple[str, str, float, float]]:
    """(shape, colour, centre x, centre y) of every drawn object of a scene sample."""
    return [
        (o["shape"], o["colour"], float(o["cx"]), float(o["cy"]))
        for o in sample.params.get("objects", [])
        if isinstance(o, dict) and {"shape", "colour", "cx", "cy"} <= o.keys()
    ]


def _document(rng: np.random.Generator, size: int, d: float) -> tuple[Image.Image, str, str, dict]:
    n_lines = round(lerp(2, 5, d))
    names = [DOC_FIELDS[i] for i in rng.choice(len(DOC_FIELDS), size=n_lines, replace=False)]
    values = [_doc_value(rng, n) for n in names]
    lines = [f"{n}: {v}" for n, v in zip(names, values, strict=True)]
    top, line_gap = _doc_layout(size, n_lines)
    wanted = max(4, round(min(lerp(12, 8, d) * size / 128, line_gap * 0.6)))
    cap = fit_cap_height(lines, wanted, size - 10)
    image = new_canvas(size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, size - 1, top - 3), fill=(200, 205, 215))  # header band
    draw.rectangle((0, 0, size - 1, size - 1), outline=(170, 170, 170))
    for i, line in enumerate(lines):
        draw_text(image, line, _DOC_X, round(top + i * line_gap), cap, INK)
    asked = int(rng.integers(n_lines))
    return (
        image,
        f"What is the {names[asked]}?",
        values[asked],
        {
            "lines": n_lines,
            "text_height": cap,
            "field": names[asked],
            "fields": dict(zip(names, values, strict=True)),
        },
    )


def _chart_geometry(size: int, n: int) -> tuple[int, int, float, int, int]:
    """(plot top, plot bottom = baseline, slot width, bar width, label cap height)."""
    plot_top, plot_bottom = round(size * 0.08), round(size * 0.82)
    slot = (size - 8) / n
    bar_w = max(2, round(slot * 0.6))
    cap = fit_cap_height(list(BAR_LABELS[:n]), max(4, round(size * 0.09)), bar_w + 4)
    return plot_top, plot_bottom, slot, bar_w, cap


def _bar_left(i: int, slot: float, bar_w: int) -> int:
    return round(4 + i * slot + (slot - bar_w) / 2)


def chart_layout(sample: Sample) -> list[tuple[str, float, float, float, int]]:
    """Every bar of a chart sample as (label, centre x, label centre y, bar middle y, rank).

    `rank` is 1 for the tallest bar, 2 for the shortest, 3 for the others; empty for other
    families. Recomputed from the sample's params with the generator's own geometry.
    """
    if sample.family != "chart":
        return []
    p = sample.params
    heights = p["heights"]
    _, bottom, slot, bar_w, cap = _chart_geometry(p["size"], len(heights))
    top, low = max(heights), min(heights)
    return [
        (
            label,
            _bar_left(i, slot, bar_w) + bar_w / 2,
            bottom + 3 + cap / 2,
            bottom - h / 2,
            1 if h == top else 2 if h == low else 3,
        )
        for i, (label, h) in enumerate(zip(p["labels"], heights, strict=True))
    ]


def _chart(rng: np.random.Generator, size: int, d: float) -> tuple[Image.Image, str, str, dict]:
    n = int(rng.integers(3, 6))
    labels = BAR_LABELS[:n]
    tallest = bool(rng.random() < 0.5)
    plot_top, plot_bottom, slot, bar_w, cap = _chart_geometry(size, n)
    span = plot_bottom - plot_top
    gap = max(1, round(lerp(0.35, 0.02, d) * span))
    target = int(rng.integers(n))
    if tallest:  # target at the top, runner-up exactly `gap` below, the rest further down
        extreme, runner = span, span - gap
        rest = [int(rng.integers(max(2, span // 6), runner + 1)) for _ in range(n - 2)]
    else:
        extreme, runner = max(2, span // 8), max(2, span // 8) + gap
        rest = [int(rng.integers(runner, span + 1)) for _ in range(n - 2)]
    others = [runner, *rest]
    others = [others[i] for i in rng.permutation(len(others))]
    heights = others[:target] + [extreme] + others[target:]
    image = new_canvas(size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    colours = [COLOUR_NAMES[i] for i in rng.choice(len(COLOUR_NAMES), size=n, replace=False)]
    for i, (h, colour) in enumerate(zip(heights, colours, strict=True)):
        x0 = _bar_left(i, slot, bar_w)
        draw.rectangle((x0, plot_bottom - h, x0 + bar_w - 1, plot_bottom - 1), fill=PALETTE[colour])
        lw = text_extent(labels[i], cap)[2] - text_extent(labels[i], cap)[0]
        draw_text(image, labels[i], x0 + (bar_w - lw) // 2, plot_bottom + 3, cap, INK)
    draw.line((2, plot_bottom, size - 3, plot_bottom), fill=INK)
    word = "tallest" if tallest else "shortest"
    return (
        image,
        f"Which bar is {word}?",
        labels[target],
        {
            "bars": n,
            "gap_px": gap,
            "heights": heights,
            "labels": list(labels),
            "colours": colours,
            "question": word,
        },
    )


Generator = Callable[[np.random.Generator, int, float], tuple[Image.Image, str, str, dict]]
_FAMILIES: dict[str, Generator] = {
    "colour": _colour,
    "existence": _existence,
    "counting": _counting,
    "position": _position,
    "ocr": _ocr,
    "document": _document,
    "chart": _chart,
}
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)

_CLOSED: dict[str, tuple[str, ...]] = {
    "colour": COLOUR_NAMES,
    "existence": ("yes", "no"),
    "counting": tuple(str(i) for i in range(1, 7)),
    "position": GRID_CELLS + tuple(f"{c} {s}" for s in SHAPES for c in COLOUR_NAMES),
    "chart": tuple(BAR_LABELS),
}
_OPEN: dict[str, re.Pattern[str]] = {
    "ocr": re.compile(rf"[{OCR_ALPHABET}]{{3,4}}"),
    "document": re.compile(r"[A-Z0-9]{2,7}"),
}


def answer_space(family: str) -> tuple[str, ...] | None:
    """The closed set of answers of `family`, or None for open-vocabulary families."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return _CLOSED.get(family)


def is_valid_answer(family: str, answer: str) -> bool:
    """Whether `answer` (as generated, before normalisation) is in `family`'s answer space."""
    space = answer_space(family)
    if space is not None:
        return answer in space
    return _OPEN[family].fullmatch(answer) is not None


def generate(
    family: str,
    rng: np.random.Generator,
    *,
    size: int = 128,
    difficulty: float | None = None,
    sample_id: str | None = None,
) -> Sample:
    """One sample of `family` drawn from `rng` (difficulty uniform in [0, 1] when not given)."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    d = float(rng.random()) if difficulty is None else float(difficulty)
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    image, question, answer, params = _FAMILIES[family](rng, size, d)
    sid = sample_id or f"{family}-{int(rng.integers(2**62)):016x}"
    return Sample(
        sid, family, question, answer, {"difficulty": round(d, 4), "size": size, **params}, image
    )


def generate_suite(
    n: int,
    *,
    seed: int,
    families: Sequence[str] | None = None,
    size: int = 128,
) -> Iterator[Sample]:
    """`n` samples, round-robin over `families` (balanced), sample i drawn from seed (seed, i).

    The same seed always yields the same samples; sample i does not depend on n.
    """
    fams = tuple(families) if families is not None else FAMILIES
    if not fams:
        raise ValueError("families must not be empty")
    for fam in fams:
        if fam not in _FAMILIES:
            raise ValueError(f"unknown family {fam!r}; expected one of {FAMILIES}")
    for i in range(n):
        fam = fams[i % len(fams)]
        rng = np.random.default_rng([seed, i])
        yield generate(fam, rng, size=size, sample_id=f"{fam}-s{seed}-{i:06d}")
