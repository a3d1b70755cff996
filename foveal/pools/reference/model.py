"""The reference VLM: a tiny vision encoder, a visual-token tier mechanism and a small decoder.

```
image (128x128) ─► [resolution: downscale to 8*sqrt(k) px] ─► conv stem (stride 8) + 2D positions
                ─► [CLS] + vision transformer ─► patch tokens + read-out of the auxiliary heads
                ─► (k tokens, or 256 then compressed to k)
                ─► projector + tier embedding ─► decoder LM over [visual | question SEP answer EOS]
```

One set of weights serves every tier and mechanism: training draws a token budget (and a
mechanism) per batch, Matryoshka-style, and a tier embedding tells the decoder how coarse its
visual tokens are. The decoder attends to all visual tokens and causally to the text; it
generates the answer greedily with a KV cache and reports per-token log-probabilities.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foveal.pools.reference.compress import MECHANISMS, check_budget, compress, square_side
from foveal.pools.reference.tokenizer import EOS, PAD, SEP, Tokenizer

#: Glyph classes of the auxiliary reading head (class 0 = no glyph centre under the token).
GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:"
#: Auxiliary dense heads on the encoder's patch grid: name -> classes (class 0 = nothing there).
#: glyph: which character (text and chart bar labels); order: its index in the askable string
#: (+1); group: which string it belongs to (the OCR word or a document field, +1); object:
#: shape x colour of a scene object. count: how many objects of its own shape the image holds
#: (at each object); bar: the rank of a chart bar (1 tallest, 2 shortest, 3 other) at its label
#: and its middle; cell: the 3x3 image cell an object sits in (+1, at each object); right: in a
#: "what is left of" scene, shape x colour of the object to the right of the asked-for one.
AUX_HEADS: dict[str, int] = {
    "glyph": len(GLYPHS) + 1,
    "order": 9,
    "group": 10,
    "object": 25,
    "count": 11,
    "bar": 4,
    "cell": 10,
    "right": 25,
}
#: How many of the decoder's last layers have their attention head 0 trained as a pointer to
#: the evidence (see ReferenceVLM.loss()).
POINTER_DEPTH = 2
_MEAN = (0.5, 0.5, 0.5)
_STD = (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class VLMConfig:
    image_size: int = 128
    patch: int = 8
    d_model: int = 128
    n_heads: int = 4
    vision_layers: int = 2
    lm_layers: int = 4
    fuse_layers: int = 1
    mlp_ratio: int = 4
    max_text: int = 64
    vocab_size: int = 0  # set from the tokenizer

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def max_tokens(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _mlp(d: int, ratio: int) -> nn.Sequential:
    """The transformer feed-forward: d -> ratio*d -> d with a GELU."""
    return nn.Sequential(nn.Linear(d, ratio * d), nn.GELU(), nn.Linear(ratio * d, d))


class Fuse(nn.Module):
    """Question-conditioned update of every visual token (FiLM, then a residual MLP).

    Each token can test locally whether it holds what the question asks about ("am I a
    circle?", "am I a glyph of the DATE field?"), so the decoder's attention only has to
    gather the tokens that said yes instead of learning that match through its queries.
    The modulation starts at zero, so at initialisation the update ignores the question.
    """

    def __init__(self, d: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.film = nn.Linear(d, 2 * d)
        self.mlp = _mlp(d, mlp_ratio)

    def forward(self, vis: Tensor, question: Tensor) -> Tensor:
        gamma, beta = self.film(question).unsqueeze(1).chunk(2, dim=-1)
        return vis + self.mlp(self.ln(vis) * (1 + gamma) + beta)


class Block(nn.Module):
    """Pre-LN transformer block with an optional KV cache and [CLS]-attention scores."""

    def __init__(self, d: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = _mlp(d, mlp_ratio)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        past: tuple[Tensor, Tensor] | None = None,
        cls_scores: bool = False,
        head0: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor | None]:
        """(output, (keys, values), scores): scores are the [CLS] query's attention over the
        other keys (`cls_scores`) or head 0's attention probabilities (B, n, keys) (`head0`)."""
        b, n, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        scores = None
        if cls_scores:  # attention of query 0 ([CLS]) over the other keys, averaged over heads
            att = (q[:, :, :1] @ k.transpose(-1, -2)) / math.sqrt(d // h)
            scores = att.softmax(-1).mean(1)[:, 0, 1:]
        elif head0:
            att = (q[:, 0] @ k[:, 0].transpose(-1, -2)) / math.sqrt(d // h)
            if mask is not None:
                att = att.masked_fill(~mask[:, 0], float("-inf"))
            scores = att.float().softmax(-1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, d))
        x = x + self.mlp(self.ln2(x))
        return x, (k, v), scores


#: Alternatives kept per generated token (OpenAI's ``top_logprobs`` allows up to 20).
TOP_ALTERNATIVES = 20


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    prompt_tokens: int  # visual + text tokens of the prompt
    #: per generated token (end-of-sequence included), the most likely tokens at that step as
    #: (token id, log-probability), most likely first: the greedy choice is the first one
    alternatives: list[list[tuple[int, float]]] = field(default_factory=list)


class ReferenceVLM(nn.Module):
    def __init__(self, config: VLMConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.tokenizer = tokenizer or Tokenizer()
        if config.vocab_size == 0:
            config = VLMConfig(**{**config.to_dict(), "vocab_size": self.tokenizer.vocab_size})
        self.config = c = config
        d = c.d_model
        if c.patch != 8:
            raise ValueError("the conv stem has stride 8")
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, 2, 1),
            nn.GELU(),
            nn.Conv2d(64, d, 3, 2, 1),
        )
        self.pos = nn.Parameter(torch.randn(1, d, c.grid, c.grid) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.vision = nn.ModuleList(
            Block(d, c.n_heads, c.mlp_ratio) for _ in range(c.vision_layers)
        )
        self.vision_ln = nn.LayerNorm(d)
        self.project = nn.Linear(d, d)
        self.question = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.fuse = nn.ModuleList(Fuse(d, c.mlp_ratio) for _ in range(c.fuse_layers))
        # Auxiliary training head: which glyph (if any) is centred under each patch token. Dense
        # supervision that teaches the encoder to see characters long before the decoder has
        # learnt where to look for them (reading otherwise sits on a loss plateau for hours).
        self.aux_heads = nn.ModuleDict({n: nn.Linear(d, c) for n, c in AUX_HEADS.items()})
        # Read-out: every patch token also carries what the heads see there (their class
        # probabilities, embedded back), so the decoder copies "this glyph is a 7", "this object
        # sits in the top-right cell" from the token it attends to instead of re-deriving it.
        # Starts at zero: at initialisation the tokens are the encoder's alone.
        self.readout = nn.Linear(sum(AUX_HEADS.values()), d)
        self.levels = square_side(c.max_tokens).bit_length()  # tiers 1, 4, 16, ... max_tokens
        self.tier_emb = nn.Embedding(len(MECHANISMS) * self.levels, d)
        self.tok_emb = nn.Embedding(c.vocab_size, d)
        self.text_pos = nn.Embedding(c.max_text, d)
        # position within the answer (0 = SEP): the i-th answer token knows it is the i-th
        self.answer_pos = nn.Embedding(c.max_text, d)
        self.lm = nn.ModuleList(Block(d, c.n_heads, c.mlp_ratio) for _ in range(c.lm_layers))
        self.lm_ln = nn.LayerNorm(d)
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        #: the last training step's loss terms (answer, pointer mass, each auxiliary head)
        self.last_losses: dict[str, float] = {}
        self.apply(self._init)
        for fuse in self.fuse:
            assert isinstance(fuse, Fuse)
            nn.init.zeros_(fuse.film.weight)
        nn.init.zeros_(self.readout.weight)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- vision -------------------------------------------------------------------------------

    def encode(self, images: Tensor, cls_scores: bool = False) -> tuple[Tensor, Tensor | None]:
        """Patch tokens (B, g*g, D) of images (B, 3, 8g, 8g) in [0, 1], and [CLS] scores."""
        x = self.stem((images - self.mean) / self.std)
        g = x.shape[-1]
        pos = self.pos if g == self.config.grid else F.adaptive_avg_pool2d(self.pos, g)
        x = (x + pos).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        scores = None
        for i, blk in enumerate(self.vision):
            last = i == len(self.vision) - 1
            x, _, s = blk(x, cls_scores=cls_scores and last)
            scores = s if s is not None else scores
        return self.vision_ln(x[:, 1:]), scores

    def read_out(self, grid: Tensor) -> Tensor:
        """Patch tokens plus the embedding of the auxiliary heads' class probabilities there.

        The probabilities are detached: the heads learn only from their own dense targets, the
        read-out learns from the answers what to take from them.
        """
        probs = [head(grid).float().softmax(-1) for head in self.aux_heads.values()]
        return grid + self.readout(torch.cat(probs, -1).detach().to(grid.dtype))

    def tier_index(self, k: int, mechanism: str) -> int:
        level = min(self.levels - 1, round(math.log(k, 4))) if k > 1 else 0
        return MECHANISMS.index(mechanism) * self.levels + level

    def visual_tokens(
        self, images: Tensor, k: int, mechanism: str = "resolution"
    ) -> tuple[Tensor, Tensor]:
        """(k visual tokens (B, k, D), the encoder's patch grid tokens) for full-size images."""
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown mechanism {mechanism!r}; expected one of {MECHANISMS}")
        check_budget(k, self.config.max_tokens)
        if mechanism == "resolution":
            side = square_side(k) * self.config.patch
            if side != images.shape[-1]:
                images = F.interpolate(images, size=(side, side), mode="area")
            grid, _ = self.encode(images)
            tokens = self.read_out(grid)
        else:
            grid, scores = self.encode(images, cls_scores=mechanism != "pool")
            tokens = self.read_out(grid)
            tokens = compress(tokens, scores if scores is not None else grid[..., 0], k, mechanism)
        tier = torch.full((1, 1), self.tier_index(k, mechanism), device=images.device)
        return self.project(tokens) + self.tier_emb(tier), grid

    # -- decoder ------------------------------------------------------------------------------

    def fuse_question(self, vis: Tensor, text: Tensor, valid: Tensor) -> Tensor:
        """Visual tokens updated by the question (the mean embedding of the text before SEP)."""
        asks = (valid & (self.answer_positions(text) < 0)).unsqueeze(-1).float()
        bag = (self.tok_emb(text) * asks).sum(1) / asks.sum(1).clamp(min=1.0)
        q = self.question(bag)
        for f in self.fuse:
            vis = f(vis, q)
        return vis

    def _decode(
        self,
        vis: Tensor,
        text: Tensor,
        valid: Tensor,
        pos: Tensor,
        rel: Tensor,
        past: list[tuple[Tensor, Tensor]] | None = None,
        key_valid: Tensor | None = None,
        pointer_layers: tuple[int, ...] = (),
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]], list[Tensor]]:
        """(hidden states of `text` positions, KV cache, head-0 attention of `pointer_layers`).

        `vis` is empty when a cache is given. `pos` are text positions, `rel` positions within
        the answer (-1 before the SEP). The attention maps are (B, text, visual tokens).
        """
        top = self.config.max_text - 1
        x = self.tok_emb(text) + self.text_pos(pos.clamp(max=top))
        x = x + self.answer_pos(rel.clamp(0, top)) * (rel >= 0).unsqueeze(-1)
        x = torch.cat([vis, x], dim=1) if past is None else x
        b, n = x.shape[:2]
        if past is None:
            k = vis.shape[1]
            key_valid = torch.cat([torch.ones(b, k, dtype=torch.bool, device=x.device), valid], 1)
            i = torch.arange(n, device=x.device)
            allowed = (i[None, :] <= i[:, None]) | (i[None, :] < k)
            mask = allowed[None] & key_valid[:, None, :]
        else:
            assert key_valid is not None
            mask = key_valid[:, None, :].expand(b, n, -1)
        cache = []
        maps = []
        k = vis.shape[1]
        for j, blk in enumerate(self.lm):
            want = past is None and j in pointer_layers
            x, kv, att = blk(x, mask[:, None], None if past is None else past[j], head0=want)
            cache.append(kv)
            if att is not None:
                maps.append(att[:, k:, :k])
        h = self.lm_ln(x)
        return (h if past is not None else h[:, k:]), cache, maps

    @staticmethod
    def answer_positions(text: Tensor) -> Tensor:
        """Index of each token within the answer: 0 at SEP, 1.. after it, -1 before it."""
        after = (text == SEP).long().cumsum(1) > 0
        return torch.where(after, after.long().cumsum(1) - 1, -1)

    def logits(self, hidden: Tensor) -> Tensor:
        return hidden @ self.tok_emb.weight.t()

    def loss(
        self,
        images: Tensor,
        text: Tensor,
        valid: Tensor,
        targets: Tensor,
        k: int,
        mechanism: str,
        dense: dict[str, Tensor] | None = None,
        aux_weight: float = 0.5,
        pointers: Tensor | None = None,
        pointer_weight: float = 0.5,
    ) -> Tensor:
        """Answer cross-entropy of `targets` (-100 = ignored) given left-padded `text` (B, T).

        `dense` maps auxiliary heads (:data:`AUX_HEADS`) to class targets (B, g, g) on the
        encoder's token grid (-100 = ignored); their cross-entropies are added x `aux_weight`.
        `pointers` (B, T, k) marks, for text positions that predict an answer token, the visual
        tokens holding the evidence for it (the glyph to read, the object asked about); head 0
        of the decoder's last :data:`POINTER_DEPTH` layers is trained to put its attention there
        (-log of the attention mass on them, x `pointer_weight`).
        """
        vis, grid = self.visual_tokens(images, k, mechanism)
        vis = self.fuse_question(vis, text, valid)
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        n = self.config.lm_layers
        layers = tuple(range(max(0, n - POINTER_DEPTH), n)) if pointers is not None else ()
        hidden, _, maps = self._decode(
            vis, text, valid, pos, self.answer_positions(text), pointer_layers=layers
        )
        logits = self.logits(hidden).flatten(0, 1).float()
        loss = F.cross_entropy(logits, targets.flatten(), ignore_index=-100)
        parts = {"answer": float(loss.detach())}
        if pointers is not None and bool(pointers.any()):
            rows = pointers.any(-1)
            for att in maps:
                mass = (att * pointers).sum(-1)[rows]
                loss = loss - pointer_weight * torch.log(mass + 1e-6).mean() / len(maps)
            parts["pointer_mass"] = float(mass.detach().mean())
        for name, target in (dense or {}).items():
            if not bool((target >= 0).any()):
                continue
            weight = torch.ones(AUX_HEADS[name], device=grid.device)
            weight[0] = 0.1  # most tokens hold nothing
            out = self.aux_heads[name](grid).flatten(0, 1).float()
            aux = F.cross_entropy(out, target.flatten(), weight=weight, ignore_index=-100)
            loss = loss + aux_weight * aux
            parts[name] = float(aux.detach())
        self.last_losses = parts
        return loss

    def encode_prompts(self, questions: list[str]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids `question SEP` (B, T) and their validity mask."""
        seqs = [self.tokenizer.encode(q)[: self.config.max_text - 16] + [SEP] for q in questions]
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), PAD, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, t - len(s) :] = torch.tensor(s)
        return ids, ids != PAD

    @torch.inference_mode()
    def generate(
        self,
        images: Tensor,
        questions: list[str],
        k: int,
        mechanism: str = "resolution",
        max_new_tokens: int = 16,
    ) -> list[Generation]:
        """Greedy answers for a batch of full-size images (B, 3, S, S) in [0, 1]."""
        ids, valid = self.encode_prompts(questions)
        ids, valid = ids.to(images.device), valid.to(images.device)
        vis, _ = self.visual_tokens(images, k, mechanism)
        vis = self.fuse_question(vis, ids, valid)
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        rel = self.answer_positions(ids)
        hidden, cache, _ = self._decode(vis, ids, valid, pos, rel)
        b = len(questions)
        key_valid = torch.cat([torch.ones(b, k, dtype=torch.bool, device=ids.device), valid], 1)
        next_pos = pos[:, -1] + 1
        next_rel = rel[:, -1] + 1
        out: list[list[int]] = [[] for _ in range(b)]
        lps: list[list[float]] = [[] for _ in range(b)]
        alts: list[list[list[tuple[int, float]]]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        last = hidden[:, -1:]
        n_alt = min(TOP_ALTERNATIVES, self.config.vocab_size)
        for _ in range(max_new_tokens):
            logp = self.logits(last[:, -1]).float().log_softmax(-1)
            top_lp, top_id = logp.topk(n_alt, -1)  # sorted: top_id[:, 0] is the argmax
            tok = top_id[:, 0]
            top_ids, top_lps = top_id.tolist(), top_lp.tolist()
            for r in range(b):
                if not done[r]:
                    out[r].append(top_ids[r][0])
                    lps[r].append(top_lps[r][0])
                    alts[r].append(list(zip(top_ids[r], top_lps[r], strict=True)))
            done |= tok == EOS
            if bool(done.all()):
                break
            key_valid = torch.cat([key_valid, torch.ones(b, 1, dtype=torch.bool)], 1)
            last, cache, _ = self._decode(
                vis[:, :0],
                tok[:, None],
                valid[:, :1],
                next_pos[:, None],
                next_rel[:, None],
                cache,
                key_valid,
            )
            next_pos = next_pos + 1
            next_rel = next_rel + 1
        prompt = [k + int(v.sum()) for v in valid]
        return [
            Generation(self.tokenizer.decode(o), [t for t in o if t != EOS], lp, p, alt)
            for o, lp, p, alt in zip(out, lps, prompt, alts, strict=True)
        ]

    # -- cost ---------------------------------------------------------------------------------

    def prefill_flops(self, k: int, mechanism: str = "resolution", text_tokens: int = 12) -> int:
        """Multiply-add FLOPs (x2) of one prefill: stem + vision encoder (with the heads' read-out)
        + projector + question fusion + decoder prompt."""
        c, d = self.config, self.config.d_model
        n_img = k if mechanism == "resolution" else c.max_tokens
        side = square_side(n_img) * c.patch if mechanism == "resolution" else c.image_size
        stem = 0
        for conv in (m for m in self.stem if isinstance(m, nn.Conv2d)):
            side = (side + 1) // 2
            stem += side * side * conv.in_channels * conv.out_channels * 9
        per_tok = 4 * d * d + 2 * c.mlp_ratio * d * d  # qkv+proj, mlp

        def layers(n: int, count: int) -> int:
            return count * (n * per_tok + 2 * n * n * d)

        seq = k + text_tokens
        vision = layers(n_img + 1, c.vision_layers)
        vision += n_img * 2 * d * sum(AUX_HEADS.values())  # the heads and their read-out
        question = 2 * d * d + c.fuse_layers * 2 * d * d  # question MLP, FiLM projections
        fuse = c.fuse_layers * k * 2 * c.mlp_ratio * d * d
        return 2 * (stem + vision + k * d * d + question + fuse + layers(seq, c.lm_layers))


def build_model(config: VLMConfig | None = None) -> ReferenceVLM:
    return ReferenceVLM(config or VLMConfig())
