"""The synthetic visual-QA suite: seeded (image, question, answer) samples in 7 task families.

General questions (colour, existence) survive heavy downscaling; reading (ocr, document) and fine
localization (position, counting small objects, close bar charts) do not, which is what routing
to a visual-token tier has to learn. See docs/dataset-format.md for the on-disk JSONL format.
"""

from __future__ import annotations

from foveal.bench.suite.dataset import (
    SPLIT_SEEDS,
    SPLITS,
    DatasetRow,
    normalise_answer,
    read_dataset,
    write_dataset,
    write_splits,
)
from foveal.bench.suite.families import (
    FAMILIES,
    Sample,
    answer_space,
    generate,
    generate_suite,
    is_valid_answer,
)
from foveal.bench.suite.render import (
    COLOUR_NAMES,
    LADDER,
    PALETTE,
    SHAPES,
    detail_retained,
    dominant_colour,
    downscale,
    ladder,
    mean_colour,
)

__all__ = [
    "COLOUR_NAMES",
    "FAMILIES",
    "LADDER",
    "PALETTE",
    "SHAPES",
    "SPLITS",
    "SPLIT_SEEDS",
    "DatasetRow",
    "Sample",
    "answer_space",
    "detail_retained",
    "dominant_colour",
    "downscale",
    "generate",
    "generate_suite",
    "is_valid_answer",
    "ladder",
    "mean_colour",
    "normalise_answer",
    "read_dataset",
    "write_dataset",
    "write_splits",
]
