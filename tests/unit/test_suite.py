"""The synthetic visual-QA suite: determinism, answer validity, rendering, format, downscaling."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from foveal.bench.suite import (
    FAMILIES,
    PALETTE,
    SPLITS,
    detail_retained,
    dominant_colour,
    downscale,
    generate,
    generate_suite,
    is_valid_answer,
    ladder,
    mean_colour,
    normalise_answer,
    read_dataset,
    write_dataset,
    write_splits,
)
from foveal.bench.suite.families import glyph_positions
from foveal.bench.suite.render import BACKGROUND


def _digest(im: Image.Image) -> str:
    return hashlib.sha256(im.tobytes()).hexdigest()


def _key(s) -> tuple:
    return (s.id, s.question, s.answer, json.dumps(s.params, sort_keys=True), _digest(s.image))


def test_same_seed_same_samples_different_seed_different() -> None:
    a = [_key(s) for s in generate_suite(35, seed=7)]
    b = [_key(s) for s in generate_suite(35, seed=7)]
    c = [_key(s)[1:] for s in generate_suite(35, seed=8)]
    assert a == b
    assert sum(x[1:] == y for x, y in zip(a, c, strict=True)) == 0


def test_generate_is_deterministic_per_family() -> None:
    for fam in FAMILIES:
        x = generate(fam, np.random.default_rng(3))
        y = generate(fam, np.random.default_rng(3))
        assert (x.question, x.answer, x.params, _digest(x.image)) == (
            y.question,
            y.answer,
            y.params,
            _digest(y.image),
        )


def test_suite_is_balanced_and_prefix_stable() -> None:
    samples = list(generate_suite(70, seed=1))
    counts = {f: sum(s.family == f for s in samples) for f in FAMILIES}
    assert set(counts.values()) == {10}
    assert [_key(s) for s in generate_suite(14, seed=1)] == [_key(s) for s in samples[:14]]


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_are_valid_and_images_well_formed(family: str) -> None:
    for s in generate_suite(40, seed=11, families=[family]):
        assert s.family == family
        assert is_valid_answer(family, s.answer), (s.question, s.answer)
        assert s.image.mode == "RGB" and s.image.size == (128, 128)
        assert 0.0 <= s.params["difficulty"] <= 1.0
        json.dumps(s.params)  # serialisable
    assert not is_valid_answer(family, "definitely not an answer")


def test_configurable_size() -> None:
    for fam in FAMILIES:
        s = generate(fam, np.random.default_rng(0), size=256, difficulty=0.5)
        assert s.image.size == (256, 256)
        assert is_valid_answer(fam, s.answer)
    with pytest.raises(ValueError):
        generate("ocr", np.random.default_rng(0), size=8)
    with pytest.raises(ValueError):
        generate("nope", np.random.default_rng(0))


def test_counting_answer_matches_drawn_objects() -> None:
    for s in generate_suite(60, seed=5, families=["counting"]):
        shape = s.params["shape"]
        targets = [o for o in s.params["objects"] if o["shape"] == shape]
        assert len(targets) == int(s.answer) == s.params["count"]
        px = np.asarray(s.image)
        for o in s.params["objects"]:  # every listed object is really drawn at its centre
            assert tuple(px[o["cy"], o["cx"]]) == PALETTE[o["colour"]]
        objs = s.params["objects"]  # and they do not overlap
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                assert (a["cx"] - b["cx"]) ** 2 + (a["cy"] - b["cy"]) ** 2 > (a["r"] + b["r"]) ** 2


def test_existence_answer_matches_objects() -> None:
    answers = set()
    for s in generate_suite(40, seed=2, families=["existence"]):
        present = any(o["shape"] == s.params["shape"] for o in s.params["objects"])
        assert s.answer == ("yes" if present else "no")
        answers.add(s.answer)
    assert answers == {"yes", "no"}


def test_position_where_answer_is_the_cell_of_the_object() -> None:
    cells = ["top", "middle", "bottom"], ["left", "center", "right"]
    seen = 0
    for s in generate_suite(60, seed=9, families=["position"]):
        if s.params["variant"] != "where":
            continue
        colour, shape = s.question.removeprefix("Where is the ").removesuffix("?").split()
        (o,) = [o for o in s.params["objects"] if (o["colour"], o["shape"]) == (colour, shape)]
        row, col = cells[0][o["cy"] * 3 // 128], cells[1][o["cx"] * 3 // 128]
        name = "center" if (row, col) == ("middle", "center") else f"{row} {col}"
        assert s.answer == name
        seen += 1
    assert seen > 10


def _ink_box(im: Image.Image) -> tuple[int, int, int, int]:
    px = np.asarray(im, dtype=np.int32)
    ink = np.abs(px - np.asarray(BACKGROUND)).sum(axis=2) > 60
    ys, xs = np.nonzero(ink)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def test_ocr_text_is_rendered_and_size_param_controls_it() -> None:
    big = generate("ocr", np.random.default_rng(1), difficulty=0.0)
    tiny = generate("ocr", np.random.default_rng(1), difficulty=1.0)
    for s in (big, tiny):
        x0, y0, x1, y1 = _ink_box(s.image)
        bx0, by0, bx1, by1 = s.params["bbox"]
        assert abs(x0 - bx0) <= 2 and abs(y0 - by0) <= 2  # ink where the params say
        assert abs((y1 - y0 + 1) - s.params["text_height"]) <= 3 + s.params["text_height"] // 5
    assert big.params["text_height"] >= 28 and tiny.params["text_height"] <= 13
    assert (_ink_box(big.image)[3] - _ink_box(big.image)[1]) > 3 * (
        _ink_box(tiny.image)[3] - _ink_box(tiny.image)[1]
    )


def test_document_and_chart_answers_are_consistent() -> None:
    for s in generate_suite(20, seed=4, families=["document"]):
        assert s.params["fields"][s.params["field"]] == s.answer
        assert f"the {s.params['field']}?" in s.question
    for s in generate_suite(40, seed=4, families=["chart"]):
        h = s.params["heights"]
        pick = max if s.params["question"] == "tallest" else min
        i = h.index(pick(h))
        assert h.count(pick(h)) == 1 and s.params["labels"][i] == s.answer


def test_ocr_detail_is_lost_at_8px_but_colour_survives() -> None:
    for seed in range(5):
        ocr = generate("ocr", np.random.default_rng(seed), difficulty=0.8)
        kept = {side: detail_retained(ocr.image, side) for side in (8, 16, 32, 64, 128)}
        assert kept[128] > 0.99
        assert kept[8] < 0.25, kept
        assert kept[8] <= kept[32] <= kept[128]
    for s in generate_suite(70, seed=3, families=["colour"]):
        small = ladder(s.image)
        assert set(small) == {8, 16, 32, 64, 128} and small[8].size == (8, 8)
        assert dominant_colour(s.image) == dominant_colour(small[8]) == s.answer
        m0, m8 = np.asarray(mean_colour(s.image)), np.asarray(mean_colour(small[8]))
        assert np.abs(m0 - m8).max() < 1.5
    restored = downscale(ocr.image, 8, restore=True)
    assert restored.size == ocr.image.size


def test_normalise_answer() -> None:
    assert normalise_answer("  top   left. ") == "TOP LEFT"
    assert normalise_answer("k4f") == normalise_answer("K4F ")
    assert normalise_answer("yes") != normalise_answer("no")


@pytest.mark.parametrize("embed", [False, True])
def test_jsonl_round_trip(tmp_path: Path, embed: bool) -> None:
    samples = list(generate_suite(14, seed=21))
    path = write_dataset(samples, tmp_path, split="test", embed=embed)
    assert path == tmp_path / "test.jsonl"
    assert (tmp_path / "images").exists() != embed
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"id", "split", "family", "question", "answer", "params", "image"}
    assert first["image"].startswith("data:image/png;base64,") == embed
    rows = list(read_dataset(path))
    assert len(rows) == len(samples)
    for row, s in zip(rows, samples, strict=True):
        assert (row.id, row.split, row.family, row.question, row.answer, row.params) == (
            s.id,
            "test",
            s.family,
            s.question,
            s.answer,
            s.params,
        )
        assert _digest(row.image) == _digest(s.image)


def test_read_dataset_reports_the_bad_line(tmp_path: Path) -> None:
    path = write_dataset(list(generate_suite(3, seed=0)), tmp_path, split="train", embed=True)
    good = path.read_text().splitlines()
    cases = {
        "{not json": "invalid JSON",
        json.dumps({"id": "x", "family": "ocr", "question": "q", "answer": "A"}): "image",
        json.dumps({**json.loads(good[0]), "image": "/etc/passwd"}): "relative",
        json.dumps({**json.loads(good[0]), "image": "images/missing.png"}): "not found",
        json.dumps({**json.loads(good[0]), "image": "data:image/png;base64,@@@"}): "base64",
        json.dumps({**json.loads(good[0]), "params": [1]}): "params",
    }
    for bad, why in cases.items():
        path.write_text("\n".join([good[0], "", good[1], bad, good[2]]) + "\n")
        with pytest.raises(ValueError, match=rf"train\.jsonl:4: .*{why}"):
            list(read_dataset(path))


def test_splits_are_disjoint(tmp_path: Path) -> None:
    paths = write_splits(tmp_path, n_train=210, n_val=70, n_test=70, seed=0, embed=True)
    assert set(paths) == set(SPLITS)
    ids: dict[str, set[str]] = {}
    hashes: dict[str, set[str]] = {}
    for split, path in paths.items():
        rows = list(read_dataset(path))
        assert all(r.split == split for r in rows)
        ids[split] = {r.id for r in rows}
        hashes[split] = {hashlib.sha256(r.image_bytes).hexdigest() for r in rows}
    assert [len(ids[s]) for s in SPLITS] == [210, 70, 70]
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not ids[a] & ids[b]
            assert not hashes[a] & hashes[b]
    again = write_splits(tmp_path / "again", n_train=210, n_val=70, n_test=70, seed=0, embed=True)
    assert again["test"].read_bytes() == paths["test"].read_bytes()


@pytest.mark.parametrize("family", ["ocr", "document"])
def test_glyph_positions_land_on_ink(family: str) -> None:
    for seed in range(4):
        s = generate(family, np.random.default_rng(seed), difficulty=seed / 3)
        grey = np.asarray(s.image.convert("L"), dtype=float)
        glyphs = glyph_positions(s)
        text = (
            s.answer
            if family == "ocr"
            else "".join(s.params["fields"]) + "".join(s.params["fields"].values())
        )
        assert len(glyphs) >= len(s.answer)
        assert {ch for ch, _, _ in glyphs} >= set(s.answer) and set(text) - {" "} >= {
            ch for ch, _, _ in glyphs if ch != ":"
        }
        h = s.params["text_height"]
        inked = [
            (
                grey[int(y - h / 2) : int(y + h / 2) + 1, int(x - h / 4) : int(x + h / 4) + 1] < 100
            ).any()
            for ch, x, y in glyphs
        ]
        assert all(inked), (s.id, glyphs)


def test_glyph_positions_are_empty_without_text() -> None:
    assert glyph_positions(generate("colour", np.random.default_rng(0))) == []
