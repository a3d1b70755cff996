"""Drawing helpers for the synthetic suite: palette, shapes, placement, text, downscaling.

Everything here is deterministic: randomness only comes from the `numpy.random.Generator`
passed in, and text uses Pillow's built-in scalable font (`ImageFont.load_default(size=N)`),
so the same seed draws the same pixels on every machine with the same Pillow/FreeType.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Rgb = tuple[int, int, int]

#: The 8 named colours; chosen to stay distinct after heavy averaging.
PALETTE: dict[str, Rgb] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 215, 30),
    "orange": (245, 135, 20),
    "purple": (130, 40, 170),
    "brown": (120, 70, 30),
    "grey": (128, 128, 128),
}
COLOUR_NAMES: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Neutral backgrounds (not in the palette, so they never count as an answer colour).
BACKGROUND: Rgb = (246, 246, 242)
INK: Rgb = (20, 20, 24)

#: The downscale ladder: side lengths in pixels, one per visual-token tier's view.
LADDER: tuple[int, ...] = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Placed:
    """One drawn object: shape kind, palette colour name, centre and radius in pixels."""

    shape: str
    colour: str
    cx: int
    cy: int
    r: int

    def as_param(self) -> dict[str, int | str]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "cx": self.cx,
            "cy": self.cy,
            "r": self.r,
        }


def new_canvas(size: int, colour: Rgb = BACKGROUND) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def draw_shape(draw: ImageDraw.ImageDraw, obj: Placed) -> None:
    """Draw `obj` filled; its extent is the circle of radius r (squares/triangles inscribed-ish)."""
    fill = PALETTE[obj.colour]
    cx, cy, r = obj.cx, obj.cy, obj.r
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        h = round(r * 0.85)
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon(
            [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill
        )
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def draw_objects(image: Image.Image, objects: Sequence[Placed]) -> None:
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_shape(draw, obj)


def place(
    rng: np.random.Generator,
    r: int,
    placed: Sequence[Placed],
    region: tuple[float, float, float, float],
    *,
    gap: int = 2,
    tries: int = 400,
) -> tuple[int, int] | None:
    """A centre inside `region` (x0, y0, x1, y1; the whole object fits) clear of `placed`."""
    x0, y0, x1, y1 = region
    lo_x, hi_x, lo_y, hi_y = x0 + r, x1 - r, y0 + r, y1 - r
    if lo_x > hi_x or lo_y > hi_y:
        return None
    for _ in range(tries):
        cx = int(round(rng.uniform(lo_x, hi_x)))
        cy = int(round(rng.uniform(lo_y, hi_y)))
        if all((cx - p.cx) ** 2 + (cy - p.cy) ** 2 > (r + p.r + gap) ** 2 for p in placed):
            return cx, cy
    return None


def scatter(
    rng: np.random.Generator,
    specs: Sequence[tuple[str, str, int]],
    size: int,
    placed: Sequence[Placed] = (),
    *,
    region: tuple[float, float, float, float] | None = None,
) -> list[Placed]:
    """Place (shape, colour, radius) specs without overlap; raises if the canvas is too full."""
    out = list(placed)
    area = region or (1.0, 1.0, size - 1.0, size - 1.0)
    for shape, colour, r in specs:
        at = place(rng, r, out, area)
        if at is None:
            raise RuntimeError(f"could not place {len(specs)} objects on a {size}px canvas")
        out.append(Placed(shape, colour, at[0], at[1], r))
    return out[len(placed) :]


@lru_cache(maxsize=128)
def font_for_cap_height(cap_px: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, int]:
    """The built-in scalable font at the smallest size whose capital 'H' is >= cap_px tall."""
    cap_px = max(1, cap_px)
    size = max(1, int(cap_px / 0.72))
    while True:
        font = ImageFont.load_default(size=size)
        left, top, right, bottom = font.getbbox("H")
        if bottom - top >= cap_px or size > 4 * cap_px + 8:
            return font, size
        size += 1


@lru_cache(maxsize=4096)
def text_extent(text: str, cap_px: int) -> tuple[int, int, int, int]:
    """Ink bounding box (left, top, right, bottom) of `text` drawn at origin (0, 0)."""
    font, _ = font_for_cap_height(cap_px)
    box = font.getbbox(text)
    return int(box[0]), int(box[1]), int(box[2]), int(box[3])


def draw_text(
    image: Image.Image, text: str, x: int, y: int, cap_px: int, fill: Rgb = INK
) -> tuple[int, int, int, int]:
    """Draw `text` with its ink box's top-left at (x, y); returns the ink box in image pixels."""
    font, _ = font_for_cap_height(cap_px)
    left, top, right, bottom = text_extent(text, cap_px)
    ImageDraw.Draw(image).text((x - left, y - top), text, font=font, fill=fill)
    return x, y, x + right - left, y + bottom - top


def glyph_centres(text: str, x: int, y: int, cap_px: int) -> list[tuple[str, float, float]]:
    """(character, centre x, centre y) of each non-space glyph of `draw_text(..., text, x, y)`."""
    font, _ = font_for_cap_height(cap_px)
    left, top, _, bottom = text_extent(text, cap_px)
    cy = y + (bottom - top) / 2
    out = []
    for i, ch in enumerate(text):
        if ch.isspace():
            continue
        a, b = font.getlength(text[:i]), font.getlength(text[: i + 1])
        out.append((ch, x - left + (a + b) / 2, cy))
    return out


def fit_cap_height(texts: Sequence[str], cap_px: int, max_width: int) -> int:
    """The largest cap height <= cap_px at which every text fits within max_width pixels."""
    while cap_px > 3:
        if all(text_extent(t, cap_px)[2] - text_extent(t, cap_px)[0] <= max_width for t in texts):
            return cap_px
        cap_px -= 1
    return cap_px


# -- resolution ladder -------------------------------------------------------------------------


def downscale(image: Image.Image, side: int, *, restore: bool = False) -> Image.Image:
    """`image` area-averaged (box filter) to side x side; `restore` scales it back up (bilinear)
    to the original size, i.e. what is left of the picture once seen at that resolution."""
    small = image.convert("RGB").resize((side, side), Image.Resampling.BOX)
    if restore:
        return small.resize(image.size, Image.Resampling.BILINEAR)
    return small


def ladder(image: Image.Image, sides: Sequence[int] = LADDER) -> dict[int, Image.Image]:
    """The image downscaled to each side length of the ladder (box filter)."""
    return {s: downscale(image, s) for s in sides}


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


def detail_retained(image: Image.Image, side: int) -> float:
    """Share of the image's detail that survives a side x side view, in [0, 1].

    Detail is the grey-level variance around the image mean; what survives is measured by
    scaling the image down (box filter) and back up (bilinear):
    1 - ||I - up(down(I))||^2 / ||I - mean(I)||^2. It is 1.0 at full resolution and near 0
    once only blobs of average colour remain (small text at 8x8, for instance).
    """
    orig = _grey(image)
    restored = _grey(downscale(image, side, restore=True))
    detail = float(((orig - orig.mean()) ** 2).sum())
    if detail == 0.0:
        return 1.0
    lost = float(((orig - restored) ** 2).sum())
    return max(0.0, 1.0 - lost / detail)


def mean_colour(image: Image.Image) -> tuple[float, float, float]:
    arr = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)
    return float(arr[0]), float(arr[1]), float(arr[2])


def nearest_colour(rgb: Sequence[float], names: Sequence[str] = COLOUR_NAMES) -> str:
    """The palette name closest (Euclidean RGB) to `rgb`."""
    v = np.asarray(rgb, dtype=np.float64)
    return min(names, key=lambda n: float(((np.asarray(PALETTE[n]) - v) ** 2).sum()))


def dominant_colour(image: Image.Image, *, tolerance: float = 48.0) -> str:
    """The palette colour with the most pixels within `tolerance` (RGB distance) of it.

    Background pixels, and blends of several colours (edges of shapes in a downscaled view,
    which would otherwise pass for grey), are not counted.
    """
    px = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3)
    refs = np.asarray([PALETTE[n] for n in COLOUR_NAMES] + [BACKGROUND], dtype=np.float64)
    dists = ((px[:, None, :] - refs[None, :, :]) ** 2).sum(axis=2)
    labels = dists.argmin(axis=1)
    pure = dists.min(axis=1) <= tolerance**2
    counts = np.bincount(labels[pure], minlength=len(refs))[: len(COLOUR_NAMES)]
    if counts.sum() == 0:  # nothing pure: fall back to the nearest colour of the mean
        return nearest_colour(px.mean(axis=0))
    return COLOUR_NAMES[int(counts.argmax())]
