"""The tier -> vLLM mapping a GPU cluster uses: pure functions, no vLLM import.

A Foveal tier is a visual-token budget per image. vLLM's Qwen2-VL / Qwen2.5-VL processors turn
each 28x28-pixel square of the resized image into one visual token (14-pixel patches merged
2x2) and resize every image to between ``min_pixels`` and ``max_pixels``. So a tier of ``k``
tokens is one vLLM server started with ``max_pixels = k*28*28``, and with ``min_pixels`` at
most that (Qwen's default floor of 4 tokens would otherwise push a 1-token tier to 4, and a
fine-tune's own floor can be far higher): the server can never spend more than the tier's
budget on an image, whatever the checkpoint's ``preprocessor_config.json`` says.

The same :class:`VllmTier` gives both sides of a deployment, so they cannot drift apart:

- :func:`serve_args`: the ``vllm serve`` command of the tier's server (what the operator runs
  in each ``backend: vllm`` ModelPool's container);
- :func:`catalog_entry`: the router's :class:`~foveal.config.TierSettings` for that server
  (same tier name, ``backend: vllm``, the served model name the router must send).

:func:`parse_serve_args` reads a command back (round trip), so a hand-written command can be
checked against a tier. Nothing here imports ``vllm``: the router talks to vLLM over HTTP only.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from foveal.api.crds import ModelPoolSpec
from foveal.config import EndpointSettings, TierSettings

__all__ = [
    "PIXELS_PER_TOKEN",
    "QWEN_MIN_PIXELS",
    "REFERENCE_TIERS",
    "VllmMappingError",
    "VllmTier",
    "catalog_entry",
    "catalog_from_commands",
    "default_max_pixels",
    "default_min_pixels",
    "from_model_pool",
    "parse_serve_args",
    "reference_vllm_tiers",
    "serve_args",
    "shell_command",
]

#: One visual token of Qwen2-VL / Qwen2.5-VL: a 28x28-pixel square (14-px patches, 2x2 merge).
PIXELS_PER_TOKEN = 28 * 28
#: Qwen2-VL's default ``min_pixels`` (4 tokens): images are upscaled to at least this much.
QWEN_MIN_PIXELS = 4 * PIXELS_PER_TOKEN
#: Foveal's reference tiers: name -> visual tokens per image.
REFERENCE_TIERS: dict[str, int] = {"t1": 1, "t4": 4, "t16": 16, "t64": 64, "t256": 256}

_T = TypeVar("_T")
_TIER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# Flags the mapping owns; anything else in a command is kept, in order, as an extra argument.
_OWN_FLAGS = (
    "--port",
    "--host",
    "--served-model-name",
    "--mm-processor-kwargs",
    "--limit-mm-per-prompt",
)


class VllmMappingError(ValueError):
    """A tier or a ``vllm serve`` command that cannot be mapped; the message names the field."""


def default_max_pixels(visual_tokens: int) -> int:
    """``max_pixels`` that caps an image at ``visual_tokens`` Qwen2-VL tokens."""
    _check_positive("visual_tokens", visual_tokens)
    return visual_tokens * PIXELS_PER_TOKEN


def default_min_pixels(max_pixels: int) -> int:
    """Qwen's 4-token floor, lowered to ``max_pixels`` for tiers below 4 tokens."""
    _check_positive("max_pixels", max_pixels)
    return min(QWEN_MIN_PIXELS, max_pixels)


@dataclass(frozen=True)
class VllmTier:
    """One tier served by one vLLM server (one Deployment in a cluster).

    ``max_pixels`` / ``min_pixels`` default to the tier's budget (:func:`default_max_pixels`,
    :func:`default_min_pixels`); set them only to override. ``served_model_name`` defaults to
    ``model``: it is the ``model`` field the router sends, and what the operator serves under.
    ``extra_args`` are appended to the command as they are (e.g. ``--max-model-len 8192``).
    """

    name: str
    visual_tokens: int
    model: str
    served_model_name: str | None = None
    port: int = 8000
    host: str | None = None
    max_pixels: int | None = None
    min_pixels: int | None = None
    limit_mm_per_prompt: int = 1
    mm_processor_kwargs: Mapping[str, Any] = field(default_factory=dict)
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _TIER_NAME.match(self.name):
            raise VllmMappingError(
                f"tier name {self.name!r}: use letters, digits, '-' or '_' (e.g. t16)"
            )
        if self.name == "auto":
            raise VllmMappingError("tier name 'auto' is reserved for routed requests")
        _check_positive("visual_tokens", self.visual_tokens)
        if not isinstance(self.model, str) or not self.model.strip():
            raise VllmMappingError(f"model {self.model!r}: give the model to serve (HF id or path)")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise VllmMappingError("served_model_name: empty; leave it unset to serve as `model`")
        if not isinstance(self.port, int) or isinstance(self.port, bool):
            raise VllmMappingError(f"port {self.port!r}: must be an integer")
        if not 1 <= self.port <= 65535:
            raise VllmMappingError(f"port {self.port}: must be in 1..65535")
        for name in ("max_pixels", "min_pixels"):
            value = getattr(self, name)
            if value is not None:
                _check_positive(name, value)
        if self.effective_min_pixels > self.effective_max_pixels:
            raise VllmMappingError(
                f"min_pixels ({self.effective_min_pixels}) is above max_pixels "
                f"({self.effective_max_pixels}): the processor could not honour both"
            )
        _check_positive("limit_mm_per_prompt", self.limit_mm_per_prompt)
        clash = {"max_pixels", "min_pixels"} & set(self.mm_processor_kwargs)
        if clash:
            raise VllmMappingError(
                f"mm_processor_kwargs: set {', '.join(sorted(clash))} with the tier's own "
                "max_pixels/min_pixels fields"
            )
        object.__setattr__(self, "mm_processor_kwargs", dict(self.mm_processor_kwargs))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))

    @property
    def served_name(self) -> str:
        """The model name the server answers to (and the router sends)."""
        return self.served_model_name or self.model

    @property
    def effective_max_pixels(self) -> int:
        return (
            self.max_pixels
            if self.max_pixels is not None
            else default_max_pixels(self.visual_tokens)
        )

    @property
    def effective_min_pixels(self) -> int:
        if self.min_pixels is not None:
            return self.min_pixels
        return default_min_pixels(self.effective_max_pixels)

    @property
    def processor_kwargs(self) -> dict[str, Any]:
        """The ``--mm-processor-kwargs`` object: the pixel bounds, then any other kwargs."""
        return {
            "max_pixels": self.effective_max_pixels,
            "min_pixels": self.effective_min_pixels,
            **self.mm_processor_kwargs,
        }


def serve_args(tier: VllmTier) -> list[str]:
    """The ``vllm serve`` command (argv) of the tier's server.

    ``--limit-mm-per-prompt`` is given as JSON (vLLM >= 0.8.5; 0.10 dropped the older
    ``image=1`` form). Extra arguments go last: vLLM keeps the last value of a repeated flag, so
    an extra ``--mm-processor-kwargs`` overrides the mapping's (an escape hatch; the catalog
    entry then no longer describes the server).
    """
    argv = ["vllm", "serve", tier.model]
    if tier.host is not None:
        argv += ["--host", tier.host]
    argv += [
        "--port", str(tier.port),
        "--served-model-name", tier.served_name,
        "--mm-processor-kwargs", _json(tier.processor_kwargs),
        "--limit-mm-per-prompt", _json({"image": tier.limit_mm_per_prompt}),
        *tier.extra_args,
    ]  # fmt: skip
    return argv


def shell_command(tier: VllmTier) -> str:
    """:func:`serve_args` quoted for a POSIX shell (for docs and copy-paste)."""
    return shlex.join(serve_args(tier))


def parse_serve_args(
    argv: Sequence[str] | str, *, name: str, visual_tokens: int | None = None
) -> VllmTier:
    """The tier a ``vllm serve`` command serves (the reverse of :func:`serve_args`).

    ``argv`` is a list or a shell string. vLLM does not know tier names, so ``name`` is given;
    ``visual_tokens`` defaults to ``max_pixels // 784`` (which must then be a whole number of
    tokens). Both ``--flag value`` and ``--flag=value`` are read, ``--limit-mm-per-prompt`` in
    its JSON and its older ``image=N`` form; other flags are kept as extra arguments.
    """
    args = shlex.split(argv) if isinstance(argv, str) else list(argv)
    if args[:2] == ["vllm", "serve"]:
        args = args[2:]
    else:
        raise VllmMappingError(f"expected a command starting with `vllm serve`, got {args[:2]}")
    if not args or args[0].startswith("-"):
        raise VllmMappingError("the command names no model: `vllm serve <model> ...`")
    model, rest = args[0], args[1:]
    own: dict[str, str] = {}
    extra: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        flag, eq, inline = arg.partition("=")
        if flag not in _OWN_FLAGS:
            extra.append(arg)
            i += 1
            continue
        if flag in own:  # a repeat (vLLM keeps the last value): an extra argument, like its value
            extra.append(arg)
            i += 1
            continue
        if eq:
            own[flag] = inline
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            own[flag] = rest[i + 1]
            i += 2
        else:
            raise VllmMappingError(f"{flag} has no value")
        if flag == "--served-model-name" and i < len(rest) and not rest[i].startswith("-"):
            raise VllmMappingError(
                "--served-model-name has several names; give one (the router sends one per tier)"
            )
    kwargs = _parse_mm_kwargs(own.get("--mm-processor-kwargs"))
    max_pixels = _int_field(kwargs.pop("max_pixels", None), "max_pixels")
    min_pixels = _int_field(kwargs.pop("min_pixels", None), "min_pixels")
    if max_pixels is None:
        raise VllmMappingError(
            "--mm-processor-kwargs has no max_pixels: the server would not cap visual tokens"
        )
    if visual_tokens is None:
        visual_tokens, left = divmod(max_pixels, PIXELS_PER_TOKEN)
        if left or not visual_tokens:
            raise VllmMappingError(
                f"max_pixels {max_pixels} is not a whole number of {PIXELS_PER_TOKEN}-pixel "
                "tokens; pass visual_tokens explicitly"
            )
    port = own.get("--port", "8000")
    if not port.isdigit():
        raise VllmMappingError(f"--port {port!r}: must be an integer")
    return VllmTier(
        name=name,
        visual_tokens=visual_tokens,
        model=model,
        served_model_name=_none_if(own.get("--served-model-name"), model),
        port=int(port),
        host=own.get("--host"),
        max_pixels=_none_if(max_pixels, default_max_pixels(visual_tokens)),
        min_pixels=_none_if(min_pixels, default_min_pixels(max_pixels)),
        limit_mm_per_prompt=_parse_image_limit(own.get("--limit-mm-per-prompt")),
        mm_processor_kwargs=kwargs,
        extra_args=tuple(extra),
    )


def catalog_entry(
    tier: VllmTier, endpoints: Iterable[str] = (), *, cost_weight: float | None = None
) -> TierSettings:
    """The router's settings for the tier: its name, budget, ``backend: vllm``, served name.

    ``endpoints`` are the servers' base URLs (``http://host:port``, no ``/v1``); the cost weight
    defaults to the visual tokens, like the reference tiers.
    """
    urls = [_base_url(u) for u in endpoints]
    return TierSettings(
        name=tier.name,
        visual_tokens=tier.visual_tokens,
        cost_weight=float(tier.visual_tokens) if cost_weight is None else cost_weight,
        backend="vllm",
        model=tier.served_name,
        endpoints=[EndpointSettings(url=u) for u in urls],
    )


def catalog_from_commands(
    commands: Mapping[str, tuple[Sequence[str] | str, Iterable[str]]],
) -> list[TierSettings]:
    """Catalog entries of running servers: tier name -> (its ``vllm serve`` command, URLs)."""
    return [
        catalog_entry(parse_serve_args(cmd, name=name), urls)
        for name, (cmd, urls) in commands.items()
    ]


def from_model_pool(spec: ModelPoolSpec) -> VllmTier:
    """The tier a ``backend: vllm`` ModelPool describes (what the operator starts for it)."""
    args = spec.backend_args
    return VllmTier(
        name=spec.tier,
        visual_tokens=spec.visual_tokens,
        model=spec.model,
        port=spec.port,
        max_pixels=args.max_pixels,
        limit_mm_per_prompt=args.limit_mm_per_prompt,
        extra_args=tuple(args.extra_args),
    )


def reference_vllm_tiers(
    model: str,
    *,
    tiers: Mapping[str, int] = REFERENCE_TIERS,
    port: int = 8000,
    extra_args: Sequence[str] = (),
) -> list[VllmTier]:
    """Foveal's reference tiers (t1 ... t256) served by ``model`` on vLLM."""
    return [
        VllmTier(name=n, visual_tokens=k, model=model, port=port, extra_args=tuple(extra_args))
        for n, k in tiers.items()
    ]


# -- helpers ----------------------------------------------------------------------------------


def _json(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj)


def _check_positive(field_name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise VllmMappingError(f"{field_name} {value!r}: must be an integer")
    if value < 1:
        raise VllmMappingError(f"{field_name} {value}: must be at least 1")


def _int_field(value: object, field_name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise VllmMappingError(f"--mm-processor-kwargs {field_name} {value!r}: must be an integer")
    return value


def _none_if(value: _T | None, default: _T) -> _T | None:
    return None if value == default else value


def _parse_mm_kwargs(raw: str | None) -> dict[str, Any]:
    if raw is None:
        raise VllmMappingError(
            "no --mm-processor-kwargs: the server would not cap visual tokens (max_pixels)"
        )
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise VllmMappingError(f"--mm-processor-kwargs is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise VllmMappingError("--mm-processor-kwargs must be a JSON object")
    return value


def _parse_image_limit(raw: str | None) -> int:
    if raw is None:
        return 1  # vLLM's own default for V0 engines; V1 allows many: say it explicitly
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if isinstance(value, dict):
        limits = value
    else:  # the older `image=2,video=0` form
        limits = {}
        for item in raw.split(","):
            key, eq, num = item.partition("=")
            if not eq or not num.strip().isdigit():
                raise VllmMappingError(
                    f"--limit-mm-per-prompt {raw!r}: expected JSON like '{{\"image\": 1}}'"
                )
            limits[key.strip()] = int(num)
    image = limits.get("image")
    if not isinstance(image, int) or isinstance(image, bool) or image < 1:
        raise VllmMappingError(
            f"--limit-mm-per-prompt {raw!r}: needs a positive image count, e.g. '{{\"image\": 1}}'"
        )
    return image


def _base_url(url: str) -> str:
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        raise VllmMappingError(f"endpoint {url!r}: expected a base URL like http://host:8000")
    base = url.rstrip("/")
    if base.endswith("/v1"):
        raise VllmMappingError(
            f"endpoint {url!r}: give the server's base URL without /v1 (the router adds "
            "/v1/chat/completions and /health)"
        )
    return base
