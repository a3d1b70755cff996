"""Turns what an edge received into a validated :class:`ChatRequest` (once, for both edges)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from foveal.config import Settings
from foveal.errors import InvalidRequest, NotFound
from foveal.pools.catalog import CatalogHolder
from foveal.router.image_urls import ImageFetcher
from foveal.router.images import load_image
from foveal.router.requests import ChatRequest, ImagePart, Message, RawImage, TextPart

__all__ = ["RawMessage", "RequestBuilder", "new_request_id"]

RawMessage = tuple[str, Sequence[str | RawImage]]
_ROLES = frozenset({"system", "user", "assistant"})


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


class RequestBuilder:
    def __init__(
        self, settings: Settings, catalog: CatalogHolder, fetcher: ImageFetcher | None
    ) -> None:
        self._limits = settings.limits
        self._catalog = catalog
        self.fetcher = fetcher

    def resolve_model(self, model: str | None) -> str:
        name = model or "auto"
        if name != "auto" and name not in self._catalog.snapshot:
            known = ", ".join(["auto", *self._catalog.snapshot.names])
            raise NotFound(
                f"The model `{name}` does not exist. Use one of: {known}.",
                param="model",
                code="model_not_found",
            )
        return name

    def resolve_max_tokens(self, max_tokens: int | None, cap: int | None) -> int:
        cap = cap or self._limits.max_tokens_cap
        if max_tokens is None:
            return min(self._limits.default_max_tokens, cap)
        if max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if max_tokens > cap:
            raise InvalidRequest(
                f"max_tokens={max_tokens} is above this tenant's cap of {cap}",
                param="max_tokens",
                code="max_tokens_exceeded",
            )
        return max_tokens

    async def build(
        self,
        *,
        tenant: str,
        tenant_cap: int | None,
        model: str | None,
        messages: Sequence[RawMessage],
        max_tokens: int | None,
        stream: bool,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: tuple[str, ...] = (),
        logprobs: bool = False,
        top_logprobs: int | None = None,
        seed: int | None = None,
        session_id: str | None = None,
        edge: str,
    ) -> ChatRequest:
        resolved = self.resolve_model(model)
        if not messages:
            raise InvalidRequest("`messages` must hold at least one message", param="messages")
        _check_sampling(temperature, top_p, logprobs, top_logprobs)
        n_images = sum(isinstance(p, RawImage) for _, parts in messages for p in parts)
        if n_images > self._limits.max_images:
            raise InvalidRequest(
                f"{n_images} images in one request; the limit is {self._limits.max_images}",
                param="messages",
                code="too_many_images",
            )
        built = [await self._message(i, role, parts) for i, (role, parts) in enumerate(messages)]
        return ChatRequest(
            request_id=new_request_id(),
            tenant=tenant,
            model=resolved,
            messages=tuple(built),
            max_tokens=self.resolve_max_tokens(max_tokens, tenant_cap),
            stream=stream,
            temperature=temperature,
            top_p=top_p,
            stop=tuple(stop),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            seed=seed,
            session_id=session_id or None,
            edge=edge,
        )

    async def _message(self, index: int, role: str, parts: Sequence[str | RawImage]) -> Message:
        if role not in _ROLES:
            raise InvalidRequest(
                f"role {role!r} is not one of system, user, assistant",
                param=f"messages[{index}].role",
            )
        # Remote fetches of one message run concurrently; data: URIs are validated inline.
        out: list[TextPart | ImagePart | asyncio.Task[ImagePart]] = []
        try:
            for j, part in enumerate(parts):
                if isinstance(part, str):
                    out.append(TextPart(part))
                    continue
                param = f"messages[{index}].content[{j}].image_url"
                load = load_image(part, self._limits, self.fetcher, param=param)
                if part.url is not None and not part.url.startswith("data:"):
                    out.append(asyncio.ensure_future(load))
                else:
                    out.append(await load)
            await asyncio.gather(*(p for p in out if isinstance(p, asyncio.Task)))
        finally:  # a failed image ends the other fetches of the message
            for p in out:
                if isinstance(p, asyncio.Task):
                    p.cancel()
        if not out:
            raise InvalidRequest(
                "message content must not be empty", param=f"messages[{index}].content"
            )
        return Message(
            role=role,
            parts=tuple(p.result() if isinstance(p, asyncio.Task) else p for p in out),
        )


def _check_sampling(
    temperature: float | None, top_p: float | None, logprobs: bool, top_logprobs: int | None
) -> None:
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        raise InvalidRequest("temperature must be between 0 and 2", param="temperature")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
    if top_logprobs is not None:
        if not logprobs:
            raise InvalidRequest("top_logprobs needs logprobs=true", param="top_logprobs")
        if not 0 <= top_logprobs <= 20:
            raise InvalidRequest("top_logprobs must be between 0 and 20", param="top_logprobs")
