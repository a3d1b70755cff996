"""The router core both edges call: decide -> dispatch -> respond -> record.

Nothing here imports an edge. The request path reads only in-memory snapshots (catalog,
policy); store writes go through the batching DecisionWriter, except feedback, which is
committed before the call returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from foveal import metrics
from foveal.config import Settings
from foveal.errors import (
    FovealError,
    InvalidRequest,
    NoEligiblePool,
    NotFound,
    PermissionDenied,
    PoolError,
)
from foveal.pools.catalog import CatalogHolder
from foveal.pools.client import PoolClient, PoolStream
from foveal.router.auth import Authenticator
from foveal.router.feedback_tokens import FeedbackTokens
from foveal.router.parsing import RawMessage, RequestBuilder
from foveal.router.policies import Decision, DecisionContext, Policy, Reward
from foveal.router.requests import ChatRequest, ImagePart
from foveal.router.results import ChatDelta, ChatResult, Usage
from foveal.router.tenant_policy import (
    TenantPolicies,
    TenantPolicy,
    TenantPolicyHolder,
    clamp_tier,
)
from foveal.store import DecisionWriter, Store
from foveal.store.records import DecisionRecord, FeedbackRecord

__all__ = ["RouterCore"]

log = logging.getLogger(__name__)


class RouterCore:
    def __init__(
        self,
        *,
        settings: Settings,
        catalog: CatalogHolder,
        policy: Policy,
        pools: PoolClient,
        store: Store,
        writer: DecisionWriter,
        auth: Authenticator,
        tokens: FeedbackTokens,
        builder: RequestBuilder,
        tenant_policies: TenantPolicyHolder | None = None,
    ) -> None:
        self.settings = settings
        self.tenant_policies = tenant_policies or TenantPolicyHolder(
            TenantPolicies(default=TenantPolicy.from_settings(settings.tenant_policy))
        )
        self.catalog = catalog
        self.policy = policy
        self.pools = pools
        self.store = store
        self.writer = writer
        self.auth = auth
        self.tokens = tokens
        self.builder = builder

    # ---- edges' entry points -------------------------------------------------------------

    async def authenticate(self, api_key: str | None) -> str:
        return await self.auth.authenticate(api_key)

    async def build_request(
        self, *, tenant: str, model: str, messages: Sequence[RawMessage], **kw: Any
    ) -> ChatRequest:
        cap = self.auth.tenant_info(tenant).max_tokens_cap
        return await self.builder.build(
            tenant=tenant, tenant_cap=cap, model=model, messages=messages, **kw
        )

    def model_names(self) -> list[str]:
        return ["auto", *self.catalog.snapshot.names]

    async def chat(self, req: ChatRequest) -> ChatResult:
        decision, tiers, token, gauge = self._begin(req)
        try:
            result = await self.pools.complete(tiers, _payload(req), deadline=self._deadline(req))
            body = result.body
            choice, content = _first_choice(body, result.tier)
        except BaseException as exc:
            self._finish(req, decision, tier=decision.tier, exc=exc)
            raise
        finally:
            gauge.dec()
        usage = Usage.from_openai(body.get("usage"))
        self._finish(req, decision, tier=result.tier, pool_s=result.latency_s, usage=usage)
        return ChatResult(
            request_id=req.request_id,
            tier=result.tier,
            feedback_token=token,
            model=result.tier,
            created=int(body.get("created") or time.time()),
            content=content,
            finish_reason=choice.get("finish_reason"),
            usage=usage,
            logprobs=choice.get("logprobs"),
        )

    async def chat_stream(self, req: ChatRequest) -> _CoreStream:
        decision, tiers, token, gauge = self._begin(req)
        try:
            upstream = await self.pools.stream(tiers, _payload(req), deadline=self._deadline(req))
        except BaseException as exc:
            gauge.dec()
            self._finish(req, decision, tier=decision.tier, exc=exc)
            raise
        return _CoreStream(self, req, decision, upstream, token)

    async def feedback(self, *, tenant: str, request_id: str, token: str, score: float) -> None:
        outcome = "error"
        try:
            if not 0.0 <= score <= 1.0:
                raise InvalidRequest("score must be between 0 and 1", param="score")
            if len(request_id) > 255:
                raise InvalidRequest("request_id is too long", param="request_id")
            try:
                self.tokens.verify(token, request_id, tenant)
            except FovealError:
                outcome = "invalid_token"
                raise
            record = FeedbackRecord(request_id=request_id, tenant=tenant, score=float(score))
            try:
                await asyncio.to_thread(self.store.add_feedback, record)
            except FovealError:
                outcome = "reused"
                raise
            outcome = "accepted"
        finally:
            metrics.FEEDBACK_TOTAL.labels(outcome).inc()
        decision = await self._lookup(request_id)
        if decision is not None:
            self.policy.update(
                Reward(request_id, tenant, decision.tier, float(score), dict(decision.features))
            )

    async def explain(self, *, tenant: str, request_id: str) -> DecisionRecord:
        record = await self._lookup(request_id)
        if record is None or record.tenant != tenant:
            raise NotFound(f"no decision recorded for {request_id!r}", param="request_id")
        return record

    # ---- internals -------------------------------------------------------------------------

    async def _lookup(self, request_id: str) -> DecisionRecord | None:
        pending = self.writer.pending(request_id)
        if pending is not None:
            return pending
        return await asyncio.to_thread(self.store.get_decision, request_id)

    def _begin(self, req: ChatRequest) -> tuple[Decision, list[str], str, Any]:
        """Decide, count the request in flight on its tier, and sign its feedback token."""
        decision, tiers = self._decide(req)
        gauge = metrics.REQUESTS_INFLIGHT.labels(decision.tier)
        gauge.inc()
        return decision, tiers, self.tokens.issue(req.request_id, req.tenant), gauge

    def _decide(self, req: ChatRequest) -> tuple[Decision, list[str]]:
        """The policy's choice under the tenant's policy, and the tiers to try in order.

        The tenant's allowed tiers bound both: a pin outside them is refused (403), an
        auto-routed choice outside them moves to the nearest allowed tier (upward first),
        and fallback never leaves them.
        """
        t0 = time.perf_counter()
        catalog = self.catalog.snapshot
        tp = self.tenant_policies.snapshot.lookup(req.tenant)
        if not catalog.tiers:
            raise NoEligiblePool(
                "no tier is available: the catalog is empty (no valid ModelPool yet)",
                retry_after_s=self.settings.pool_client.breaker_reset_s,
            )
        if req.pinned:
            if req.model not in catalog:  # the tier left the catalog since the request came
                known = ", ".join(["auto", *catalog.names])
                raise NotFound(
                    f"The model `{req.model}` does not exist. Use one of: {known}.",
                    param="model",
                    code="model_not_found",
                )
            if not tp.allows(req.model):
                raise PermissionDenied(
                    f"tier {req.model!r} is not allowed for tenant {req.tenant!r}; allowed "
                    f"tiers: {', '.join(tp.allowed_tiers)} (or model `auto`)",
                    param="model",
                    code="tier_not_allowed",
                )
        decision = self.policy.select(
            DecisionContext(request=req, catalog=catalog, tenant_policy=tp)
        )
        tier = clamp_tier(decision.tier, catalog.names, tp)
        if tier is None:
            raise NoEligiblePool(
                f"none of the tiers allowed for tenant {req.tenant!r} "
                f"({', '.join(tp.allowed_tiers)}) is in the catalog ({', '.join(catalog.names)})",
                retry_after_s=self.settings.pool_client.breaker_reset_s,
            )
        features = {**decision.features, "tenant_policy": tp.summary()}
        if tier != decision.tier:
            reason = f"{decision.reason}; {decision.tier} not allowed, nearest allowed {tier}"
            decision = dataclasses.replace(decision, tier=tier, reason=reason, features=features)
        else:
            decision = dataclasses.replace(decision, features=features)
        metrics.TIER_DEMAND_TOTAL.labels(tier).inc()  # demand, before any fallback
        if req.pinned or not self.settings.pool_client.fallback:
            tiers = [tier]
        else:
            tiers = [t for t in catalog.fallback_order(tier) if tp.allows(t)]
        metrics.DECISION_SECONDS.observe(time.perf_counter() - t0)
        return decision, tiers

    def _deadline(self, req: ChatRequest) -> float:
        elapsed = time.perf_counter() - req.received_at
        return time.monotonic() + self.settings.pool_client.request_timeout_s - elapsed

    def _finish(
        self,
        req: ChatRequest,
        decision: Decision,
        *,
        tier: str,
        pool_s: float | None = None,
        usage: Usage | None = None,
        exc: BaseException | None = None,
    ) -> None:
        """Count the request and hand its decision record to the writer (never raises)."""
        total_s = time.perf_counter() - req.received_at
        if exc is None:
            outcome, error = "ok", None
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
            outcome, error = "cancelled", "client disconnected"
        elif isinstance(exc, FovealError):
            outcome, error = "error", f"{type(exc).__name__}: {exc.message}"
        else:
            outcome, error = "error", f"{type(exc).__name__}: {exc}"
        metrics.REQUESTS_TOTAL.labels(req.edge, tier, outcome).inc()
        if outcome == "ok":
            metrics.REQUEST_SECONDS.labels(tier).observe(total_s)
            if tier != decision.tier:
                metrics.POOL_FALLBACKS_TOTAL.labels(decision.tier).inc()
        if pool_s is not None:
            metrics.GATEWAY_OVERHEAD_SECONDS.labels(req.edge).observe(max(0.0, total_s - pool_s))
        answered = self.catalog.snapshot.get(tier)
        record = DecisionRecord(
            request_id=req.request_id,
            tenant=req.tenant,
            tier=tier,
            chosen_tier=decision.tier,
            requested_model=req.model,
            policy=decision.policy,
            reason=decision.reason,
            propensity=decision.propensity,
            features=_features(req, decision),
            predicted=dict(decision.predicted),
            outcome=outcome,
            error=error,
            latency_ms=round(total_s * 1000, 3),
            pool_latency_ms=None if pool_s is None else round(pool_s * 1000, 3),
            cost=answered.cost_weight if answered is not None and outcome == "ok" else None,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            edge=req.edge,
        )
        try:
            self.writer.submit(record)
        except FovealError:
            log.error(
                "decision of %s not recorded: the store's queue is full (see "
                "foveal_store_decisions_pending)",
                req.request_id,
                extra={"request_id": req.request_id, "tenant": req.tenant, "tier": tier},
            )


class _CoreStream:
    """A streamed answer: relays the pool's chunks as ChatDeltas and records the outcome once."""

    def __init__(
        self,
        core: RouterCore,
        req: ChatRequest,
        decision: Decision,
        upstream: PoolStream,
        token: str,
    ) -> None:
        self._core, self._req, self._decision, self._up = core, req, decision, upstream
        self.request_id = req.request_id
        self.tier = upstream.tier
        self.feedback_token = token
        self.model = upstream.tier
        self.created = int(time.time())
        self._usage: Usage | None = None
        self._done = False

    async def __aiter__(self) -> AsyncIterator[ChatDelta]:
        try:
            async for chunk in self._up:
                usage = Usage.from_openai(chunk.get("usage"))
                if usage is not None:
                    self._usage = usage
                choices = chunk.get("choices") or []
                if not choices:
                    if usage is not None:
                        yield ChatDelta(usage=usage)
                    continue
                choice = choices[0]
                delta = choice.get("delta") or {}
                yield ChatDelta(
                    content=delta.get("content") or "",
                    finish_reason=choice.get("finish_reason"),
                    usage=usage,
                    logprobs=choice.get("logprobs"),
                )
        except BaseException as exc:
            self._close_record(exc)
            raise
        self._close_record(None)

    def _close_record(self, exc: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        metrics.REQUESTS_INFLIGHT.labels(self._decision.tier).dec()
        self._core._finish(
            self._req,
            self._decision,
            tier=self._up.tier,
            pool_s=self._up.pool_seconds,
            usage=self._usage,
            exc=exc,
        )

    async def aclose(self) -> None:
        try:
            await self._up.aclose()
        finally:
            self._close_record(asyncio.CancelledError())


def _first_choice(body: dict[str, Any], tier: str) -> tuple[dict[str, Any], str]:
    try:
        choice = body["choices"][0]
        return choice, choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise PoolError(f"the {tier} pool answered without a message") from None


def _payload(req: ChatRequest) -> dict[str, Any]:
    """The OpenAI chat-completions body sent to a pool (the pool client sets `model`)."""
    messages = []
    for m in req.messages:
        if len(m.parts) == 1 and not isinstance(m.parts[0], ImagePart):
            content: Any = m.parts[0].text
        else:
            content = [
                {"type": "image_url", "image_url": {"url": p.data_uri}}
                if isinstance(p, ImagePart)
                else {"type": "text", "text": p.text}
                for p in m.parts
            ]
        messages.append({"role": m.role, "content": content})
    body: dict[str, Any] = {"messages": messages, "max_tokens": req.max_tokens}
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p", "seed", "top_logprobs"):
        value = getattr(req, key)
        if value is not None:
            body[key] = value
    if req.stop:
        body["stop"] = list(req.stop)
    if req.logprobs:
        body["logprobs"] = True
    return body


def _features(req: ChatRequest, decision: Decision) -> dict[str, Any]:
    images = req.images
    summary = {
        "images": len(images),
        "image_sizes": [[i.width, i.height] for i in images],
        "prompt_chars": len(req.prompt_text),
        "turn": req.turn_index,
    }
    summary.update(decision.features)
    if req.session_id:
        summary["session"] = True
    return summary
