"""Saving and loading reference-VLM checkpoints (weights in fp16 + configs, offline, small).

The shipped checkpoint lives inside the package (``foveal/pools/reference/weights/``) and loads
with no network access: ``load_checkpoint()`` with no argument returns it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from foveal.pools.reference.model import ReferenceVLM, VLMConfig
from foveal.pools.reference.tokenizer import Tokenizer

SHIPPED = Path(__file__).parent / "weights" / "foveal-ref.pt"
FORMAT = 4


def save_checkpoint(model: ReferenceVLM, path: Path, **meta: Any) -> None:
    """Write `model` to `path` atomically (fp16 weights: half the size, same accuracy)."""
    state = {k: v.detach().to(torch.float16) for k, v in model.state_dict().items()}
    blob = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "tokenizer": model.tokenizer.config(),
        "state_dict": state,
        "meta": meta,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path | None = None) -> ReferenceVLM:
    """The model stored at `path` (default: the shipped checkpoint), in eval mode, fp32."""
    path = path or SHIPPED
    if not path.exists():
        raise FileNotFoundError(
            f"no reference-VLM checkpoint at {path}; train one with `foveal vlm train --out {path}`"
        )
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {blob.get('format')!r}")
    model = ReferenceVLM(VLMConfig(**blob["config"]), Tokenizer(**blob["tokenizer"]))
    model.load_state_dict({k: v.float() for k, v in blob["state_dict"].items()})
    model.eval()
    return model


def checkpoint_meta(path: Path | None = None) -> dict[str, Any]:
    blob = torch.load(path or SHIPPED, map_location="cpu", weights_only=True)
    return dict(blob.get("meta", {}))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
