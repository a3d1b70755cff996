"""The reference VLM: tokenizer, compressors, tiers, decoding, training step, checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from foveal.bench.suite import generate
from foveal.bench.suite.families import (
    COLOUR_NAMES,
    DOC_FIELDS,
    GRID_CELLS,
    SHAPES,
    chart_layout,
    object_positions,
    reading_layout,
)
from foveal.bench.training import (
    Batch,
    TrainConfig,
    batches,
    dense_targets,
    evidence,
    make_optimizer,
    pointer_targets,
    schedule,
    train_step,
)
from foveal.pools.reference.checkpoint import SHIPPED, load_checkpoint, save_checkpoint
from foveal.pools.reference.compress import (
    cls_topk_indices,
    compress,
    grid_pool,
    kcenter_indices,
)
from foveal.pools.reference.data import glyph_targets, grid_cell, image_tensor, text_batch
from foveal.pools.reference.model import GLYPHS, TOP_ALTERNATIVES, VLMConfig, build_model
from foveal.pools.reference.tokenizer import EOS, SEP, Tokenizer

SMALL = VLMConfig(d_model=32, n_heads=2, vision_layers=1, lm_layers=1, mlp_ratio=2)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(SMALL).eval()


def _images(n: int, family: str = "ocr") -> torch.Tensor:
    rng = np.random.default_rng(0)
    return image_tensor([generate(family, rng).image for _ in range(n)], 128)


@pytest.mark.parametrize(
    "text", ["What word is written?", "K7XQ", "bottom center", "héllo wörld ✓", "", "ID: 12MAR"]
)
def test_tokenizer_round_trips_any_text(text: str) -> None:
    tok = Tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_uses_words_for_questions_and_bytes_for_codes() -> None:
    tok = Tokenizer()
    assert len(tok.encode("What is the dominant colour of the image?")) <= 16
    assert len(tok.encode("K7XQ")) == 4  # one token per character: reading spells it out
    assert tok.decode([*tok.encode("yes"), EOS, *tok.encode("no")]) == "yes"


@pytest.mark.parametrize("k", [1, 4, 16, 64])
def test_grid_pool_keeps_the_budget_and_averages(k: int) -> None:
    tokens = torch.randn(2, 256, 8)
    out = grid_pool(tokens, k)
    assert out.shape == (2, k, 8)
    assert torch.allclose(out.mean(1), tokens.mean(1), atol=1e-5)  # equal-size cells


@pytest.mark.parametrize("k", [1, 5, 16, 100])
def test_cls_topk_keeps_the_most_attended_in_spatial_order(k: int) -> None:
    scores = torch.rand(3, 256)
    idx = cls_topk_indices(scores, k)
    assert idx.shape == (3, k)
    assert bool((idx[:, 1:] > idx[:, :-1]).all())  # spatial (row-major) order kept
    for row in range(3):
        kept = scores[row, idx[row]]
        dropped = scores[row].clone()
        dropped[idx[row]] = -1
        assert float(kept.min()) >= float(dropped.max())
    assert torch.equal(idx, cls_topk_indices(scores.clone(), k))  # deterministic


def test_cls_topk_breaks_ties_deterministically() -> None:
    assert cls_topk_indices(torch.zeros(1, 16), 3).tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("k", [1, 4, 16, 64])
def test_kcenter_selects_distinct_diverse_tokens_in_order(k: int) -> None:
    torch.manual_seed(1)
    tokens = torch.randn(2, 256, 16)
    idx = kcenter_indices(tokens, k, torch.tensor([3, 200]))
    assert idx.shape == (2, k)
    assert bool((idx[:, 1:] > idx[:, :-1]).all())  # distinct and in spatial order
    assert 3 in idx[0].tolist() and 200 in idx[1].tolist()  # seeded by the first pick
    assert torch.equal(idx, kcenter_indices(tokens, k, torch.tensor([3, 200])))


def test_kcenter_covers_clusters_that_topk_would_miss() -> None:
    # 4 tight clusters of 64 tokens each: k-center takes one from each before any repeat
    centres = torch.eye(4, 8) * 10
    tokens = centres.repeat_interleave(64, 0)[None] + 0.01 * torch.randn(1, 256, 8)
    idx = kcenter_indices(tokens, 4, torch.tensor([0]))
    assert sorted({i // 64 for i in idx[0].tolist()}) == [0, 1, 2, 3]


def test_compress_rejects_bad_budgets_and_mechanisms() -> None:
    tokens, scores = torch.randn(1, 256, 8), torch.rand(1, 256)
    with pytest.raises(ValueError, match="square"):
        compress(tokens, scores, 5, "pool")
    with pytest.raises(ValueError, match="between 1 and 256"):
        compress(tokens, scores, 300, "cls-topk")
    with pytest.raises(ValueError, match="unknown compression"):
        compress(tokens, scores, 4, "magic")


@pytest.mark.parametrize("mechanism", ["resolution", "pool", "cls-topk", "kcenter"])
@pytest.mark.parametrize("k", [1, 16, 256])
def test_every_tier_and_mechanism_emits_k_visual_tokens(model, mechanism: str, k: int) -> None:
    vis, grid = model.visual_tokens(_images(2), k, mechanism)
    assert vis.shape == (2, k, SMALL.d_model)
    expected_grid = k if mechanism == "resolution" else 256
    assert grid.shape == (2, expected_grid, SMALL.d_model)


def test_resolution_tiers_cost_less_and_flops_grow_with_k(model) -> None:
    flops = [model.prefill_flops(k) for k in (1, 4, 16, 64, 256)]
    assert flops == sorted(flops) and flops[-1] > 10 * flops[0]
    # compression after the full encoder saves decoder work only
    assert model.prefill_flops(16, "pool") > model.prefill_flops(16, "resolution")
    assert model.prefill_flops(16, "pool") < model.prefill_flops(256, "resolution")


def test_generate_reports_prompt_tokens_and_logprobs(model) -> None:
    q = ["What word is written?", "Is there a circle?"]
    out4 = model.generate(_images(2), q, 4, max_new_tokens=5)
    out16 = model.generate(_images(2), q, 16, max_new_tokens=5)
    for a, b in zip(out4, out16, strict=True):
        assert b.prompt_tokens - a.prompt_tokens == 12  # visual tokens count in the prompt
        assert 1 <= len(a.logprobs) <= 5 and all(lp <= 0 for lp in a.logprobs)
        assert len(a.token_ids) <= len(a.logprobs)
        # every step's alternatives: the 20 most likely tokens, the greedy choice first
        assert len(a.alternatives) == len(a.logprobs)
        for alts, lp, tok in zip(a.alternatives, a.logprobs, a.token_ids + [EOS], strict=False):
            assert len(alts) == TOP_ALTERNATIVES and alts[0] == (tok, lp)
            lps = [x for _, x in alts]
            assert lps == sorted(lps, reverse=True) and len({t for t, _ in alts}) == len(alts)


def test_cached_decoding_matches_a_full_recompute(model) -> None:
    images, q = _images(3), ["What word is written?", "How many circles are there?", "Hi"]
    gens = model.generate(images, q, 16, max_new_tokens=6)
    ids, valid = model.encode_prompts(q)
    with torch.no_grad():
        vis, _ = model.visual_tokens(images, 16, "resolution")
        for r, g in enumerate(gens):
            seq, ok = ids[r : r + 1], valid[r : r + 1]
            for tok in g.token_ids[:3]:
                pos = (ok.long().cumsum(1) - 1).clamp(min=0)
                rel = model.answer_positions(seq)
                fused = model.fuse_question(vis[r : r + 1], seq, ok)
                hidden, _, _ = model._decode(fused, seq, ok, pos, rel)
                assert int(model.logits(hidden[:, -1]).argmax()) == tok
                seq = torch.cat([seq, torch.tensor([[tok]])], 1)
                ok = torch.cat([ok, torch.tensor([[True]])], 1)


def test_batched_generation_matches_one_by_one(model) -> None:
    images, q = _images(3), ["What word is written?", "Is there a red square?", "Which bar?"]
    together = model.generate(images, q, 16, max_new_tokens=4)
    alone = [model.generate(images[i : i + 1], [q[i]], 16, max_new_tokens=4)[0] for i in range(3)]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]


def test_text_batch_targets_only_the_answer() -> None:
    tok = Tokenizer()
    text, valid, targets = text_batch(tok, ["What word is written?", "Hi"], ["AB", "yes"], 64)
    for r, answer in enumerate(["AB", "yes"]):
        want = [*tok.encode(answer), EOS]
        assert [t for t in targets[r].tolist() if t != -100] == want
        assert int(valid[r].sum()) == len(tok.encode(["What word is written?", "Hi"][r])) + 1 + len(
            want
        )


def test_glyph_targets_mark_glyph_centres_on_the_grid() -> None:
    t = glyph_targets([[("A", 4.0, 4.0), ("7", 127.0, 64.0)], None], 16, 128, GLYPHS)
    assert int(t[0, 0, 0]) == GLYPHS.index("A") + 1
    assert int(t[0, 8, 15]) == GLYPHS.index("7") + 1
    assert int((t[0] > 0).sum()) == 2 and bool((t[1] == -100).all())


def test_schedule_is_deterministic_and_covers_every_tier() -> None:
    cfg = TrainConfig(steps=400, batch_size=2)
    assert [schedule(cfg, s) for s in range(400)] == [schedule(cfg, s) for s in range(400)]
    main = {schedule(cfg, s)[0] for s in range(int(cfg.warmup_frac * 400), 400)}
    assert main == {1, 4, 16, 64, 256}
    a, b = next(batches(cfg, 5)), next(batches(cfg, 5))
    assert [s.answer for s in a.samples] == [s.answer for s in b.samples]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_training_steps_reduce_the_loss_on_a_fixed_batch(bf16: bool) -> None:
    torch.manual_seed(0)
    m = build_model(SMALL)
    cfg = TrainConfig(steps=10, batch_size=8, lr=3e-3)
    opt = make_optimizer(m, cfg)
    batch = next(batches(cfg, 0))
    first = train_step(m, opt, batch, cfg.lr, bf16=bf16)
    for _ in range(25):
        last = train_step(m, opt, batch, cfg.lr, bf16=bf16)
    assert np.isfinite(first) and last < 0.7 * first
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_checkpoint_round_trip_gives_identical_answers(model, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, note="test")
    loaded = load_checkpoint(path)
    images, q = _images(2), ["What word is written?"] * 2
    want = [
        g.token_ids
        for g in copy.deepcopy(model).half().float().generate(images, q, 16, max_new_tokens=4)
    ]
    assert [g.token_ids for g in loaded.generate(images, q, 16, max_new_tokens=4)] == want


def test_missing_checkpoint_names_the_training_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="foveal vlm train"):
        load_checkpoint(tmp_path / "nope.pt")


def test_shipped_checkpoint_is_small_and_loads_offline() -> None:
    assert SHIPPED.stat().st_size <= 20 * 1024 * 1024
    m = load_checkpoint()
    g = m.generate(_images(1, "colour"), ["What is the dominant colour of the image?"], 1)
    assert g[0].text  # answers something


def test_answer_positions_count_from_the_separator(model) -> None:
    text = torch.tensor([[0, 5, 6, SEP, 7, 8, EOS], [9, 9, 9, 9, SEP, 7, EOS]])
    assert model.answer_positions(text).tolist() == [
        [-1, -1, -1, 0, 1, 2, 3],
        [-1, -1, -1, -1, 0, 1, 2],
    ]


def test_reading_layout_indexes_the_askable_string() -> None:
    s = generate("document", np.random.default_rng(3), difficulty=0.5)
    asked = 1 + DOC_FIELDS.index(s.params["field"])
    value = [(ch, i) for ch, _, _, i, g in reading_layout(s) if g == asked and i >= 0]
    assert "".join(ch for ch, _ in value) == s.answer
    assert [i for _, i in value] == list(range(len(s.answer)))
    ocr = generate("ocr", np.random.default_rng(4))
    assert "".join(ch for ch, *_ in reading_layout(ocr)) == ocr.answer


def test_dense_targets_follow_the_grid_and_family() -> None:
    rng = np.random.default_rng(0)
    samples = [generate(f, rng) for f in ("ocr", "counting", "chart")]
    fine = dense_targets(samples, 16, 128)
    assert int((fine["glyph"][0] > 0).sum()) == len(samples[0].answer)
    assert sorted(fine["order"][0][fine["order"][0] > 0].tolist()) == list(
        range(1, len(samples[0].answer) + 1)
    )
    assert bool((fine["glyph"][1] == -100).all())  # no text in a counting scene
    assert int((fine["object"][1] > 0).sum()) >= 1  # but objects
    assert bool((fine["object"][2] == -100).all()) and bool((fine["order"][2] == -100).all())
    labels = sorted(fine["glyph"][2][fine["glyph"][2] > 0].tolist())  # a chart's bar labels
    assert labels == sorted(GLYPHS.index(lb) + 1 for lb in samples[2].params["labels"])
    coarse = dense_targets(samples, 2, 128)  # too coarse for anything
    assert all(bool((t == -100).all()) for t in coarse.values())


def test_chart_layout_ranks_the_bars_and_evidence_is_the_asked_label() -> None:
    rng = np.random.default_rng(5)
    for _ in range(10):
        s = generate("chart", rng)
        bars = chart_layout(s)
        heights = s.params["heights"]
        assert [b[0] for b in bars] == s.params["labels"]
        assert bars[int(np.argmax(heights))][4] == 1 and bars[int(np.argmin(heights))][4] == 2
        xs = [b[1] for b in bars]
        assert xs == sorted(xs) and all(0 < b[1] < 128 and 0 < b[2] < 128 for b in bars)
        asked = 1 if s.params["question"] == "tallest" else 2
        assert [b[0] for b in bars if b[4] == asked] == [s.answer]
        (where,) = evidence(s)  # one list for the whole answer: the asked bar's label
        assert where == [(b[1], b[2]) for b in bars if b[0] == s.answer]
    assert chart_layout(generate("ocr", rng)) == []


def test_count_and_bar_targets_hold_the_counts_and_ranks() -> None:
    rng = np.random.default_rng(1)
    counting = generate("counting", rng, difficulty=0.0)  # no distractors, big objects
    chart = generate("chart", rng)
    dense = dense_targets([counting, chart], 16, 128)
    count = dense["count"][0]
    assert set(count[count > 0].tolist()) == {int(counting.answer)}
    assert bool((dense["count"][1] == -100).all())
    ranks = dense["bar"][1][dense["bar"][1] > 0].tolist()
    assert ranks.count(1) == 2 and ranks.count(2) == 2  # label and middle of each extreme bar


def test_cell_and_right_targets_name_the_objects_cell_and_right_neighbour() -> None:
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(40):
        s = generate("position", rng)
        dense = dense_targets([s], 16, 128)
        objects = object_positions(s)
        cells = dense["cell"][0]
        if s.params["variant"] == "where":
            asked = GRID_CELLS.index(s.answer) + 1
            gx, gy = grid_cell(*objects[0][2:], 16, 128)
            assert int(cells[gy, gx]) == asked  # the asked object's token names its 3x3 cell
            assert bool((dense["right"][0] == -100).all())
        else:
            right = dense["right"][0]
            (cls,) = right[right > 0].tolist()  # one token: the answer object
            asked = s.question.removeprefix("What is left of the ").rstrip("?")
            shape, colour = asked.split()[::-1]
            assert cls == 1 + SHAPES.index(shape) * len(COLOUR_NAMES) + COLOUR_NAMES.index(colour)
            gx, gy = grid_cell(*objects[0][2:], 16, 128)
            assert int(right[gy, gx]) == cls and " ".join(objects[0][1::-1]) == s.answer
        seen.add(s.params["variant"])
    assert seen == {"where", "left_of"}


def test_pointer_targets_mark_each_characters_glyph_and_nothing_else() -> None:
    tok = Tokenizer()
    rng = np.random.default_rng(2)
    ocr, colour, where = generate("ocr", rng), generate("colour", rng), None
    while where is None or where.params["variant"] != "where":
        where = generate("position", rng)
    samples = [ocr, colour, where]
    _, _, targets = text_batch(tok, [s.question for s in samples], [s.answer for s in samples], 64)
    ptr = pointer_targets(samples, targets, tok, 16, 128)
    rows = (targets[0] != -100).nonzero().flatten().tolist()
    glyphs = {i: (x, y) for _, x, y, i, _ in reading_layout(ocr)}
    for j, pos in enumerate(rows[: len(ocr.answer)]):
        x, y = glyphs[j]
        assert ptr[0, pos].nonzero().flatten().tolist() == [int(y / 8) * 16 + int(x / 8)]
    assert not bool(ptr[0, rows[-1]].any())  # EOS: nothing to look at
    assert not bool(ptr[1].any())  # colour: the whole image is the evidence
    asked = where.params["objects"][0]
    cell = int(asked["cy"] / 8) * 16 + int(asked["cx"] / 8)
    marked = {tuple(ptr[2, p].nonzero().flatten().tolist()) for p in range(ptr.shape[1])}
    assert marked == {(), (cell,)}


def test_pointer_supervision_moves_decoder_attention_to_the_evidence() -> None:
    torch.manual_seed(0)
    m = build_model(SMALL)
    cfg = TrainConfig(steps=10, batch_size=8, lr=3e-3)
    opt = make_optimizer(m, cfg)
    rng = np.random.default_rng(0)
    batch = Batch(16, "resolution", [generate("ocr", rng) for _ in range(8)])
    train_step(m, opt, batch, cfg.lr)
    first = m.last_losses["pointer_mass"]
    for _ in range(30):
        train_step(m, opt, batch, cfg.lr)
    assert m.last_losses["pointer_mass"] > 2 * first

    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in m.parameters())


def test_prefill_flops_match_the_operations_torch_counts(model) -> None:
    """The analytic count = torch's FLOP counter on the real prefill + attention scores/values
    (the counter does not see the fused CPU attention kernel, so those are added here)."""
    from torch.utils.flop_counter import FlopCounterMode

    c, img = model.config, _images(1)
    ids, valid = model.encode_prompts(["How many circles are there?"])
    for k in (1, 16, 256):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            vis, _ = model.visual_tokens(img, k)
            vis = model.fuse_question(vis, ids, valid)
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)
            model._decode(vis, ids, valid, pos, model.answer_positions(ids))
        seq = k + ids.shape[1]
        attention = 4 * c.d_model * (c.vision_layers * (k + 1) ** 2 + c.lm_layers * seq**2)
        counted = counter.get_total_flops() + attention
        assert counted == pytest.approx(model.prefill_flops(k, text_tokens=ids.shape[1]), rel=0.02)
