"""The router core both edges call: decide -> dispatch -> respond -> record.

Nothing here imports an edge. The request path reads only in-memory snapshots (catalog,
policy, sessions); store writes go through the batching DecisionWriter, except feedback, which
is committed before the call returns.

What the core enforces around the policy's choice, in order:

1. allowed tiers: a pin outside them is refused (403); an auto choice moves to the nearest
   allowed tier (upward first);
2. the session floor: an auto-routed turn of a session never goes below the tier that answered
   the session's previous turn, unless the tenant policy allows downgrades
   (``foveal.router.sessions``);
3. fallback under the floors: when the chosen tier is down or saturated (every endpoint's
   breaker open or unhealthy, or answering 429), the request moves to the next tier of the
   fallback order only if that tier is allowed, not below the session floor and, when the
   policy predicted P(correct) per tier and the tenant has a quality floor, predicted to meet
   that floor. Otherwise the request is refused at once (503 + Retry-After) with a message
   naming the tiers tried, the tiers left out and why;
4. the cascade (``foveal.router.cascade``), for auto-routed non-streamed requests of tenants
   that enable it.
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
from foveal.pools.client import PoolClient, PoolResult, PoolStream
from foveal.router.auth import Authenticator
from foveal.router.cascade import higher_tiers, run_cascade
from foveal.router.feedback_tokens import FeedbackTokens
from foveal.router.parsing import RawMessage, RequestBuilder
from foveal.router.policies import Decision, DecisionContext, Policy, Reward
from foveal.router.requests import ChatRequest, ImagePart
from foveal.router.results import ChatDelta, ChatResult, Usage
from foveal.router.sessions import MAX_SESSION_ID_CHARS, SessionTiers, session_key
from foveal.router.tenant_policy import (
    CascadePolicy,
    TenantPolicies,
    TenantPolicy,
    TenantPolicyHolder,
    clamp_tier,
)
from foveal.store import DecisionWriter, Store
from foveal.store.records import DecisionRecord, FeedbackRecord

__all__ = ["RouterCore"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class _Route:
    """A decision and how to carry it out: the tiers to try, in order, and what was left out."""

    decision: Decision
    tiers: list[str]
    excluded: dict[str, str]  # fallback tier -> why it may not answer this request
    cascade: CascadePolicy | None  # set when this request cascades
    tenant_policy: TenantPolicy


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
        sessions: SessionTiers | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions or SessionTiers(
            settings.sessions.max_sessions, settings.sessions.ttl_s
        )
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
        session_id = kw.get("session_id")
        if session_id is not None and len(session_id) > MAX_SESSION_ID_CHARS:
            raise InvalidRequest(
                f"session id is {len(session_id)} characters long; the limit is "
                f"{MAX_SESSION_ID_CHARS}",
                param="session_id",
            )
        cap = self.auth.tenant_info(tenant).max_tokens_cap
        return await self.builder.build(
            tenant=tenant, tenant_cap=cap, model=model, messages=messages, **kw
        )

    def model_names(self) -> list[str]:
        return ["auto", *self.catalog.snapshot.names]

    async def chat(self, req: ChatRequest) -> ChatResult:
        route, token, gauge = self._begin(req)
        decision = route.decision
        payload = _payload(req)
        if route.cascade is not None:
            payload["logprobs"] = True  # the cascade's confidence; stripped below if not asked
        deadline = self._deadline(req)
        try:
            result = await self._complete(route, payload, deadline)
            answers = [result]
            if route.cascade is not None:
                names, tp = self.catalog.snapshot.names, route.tenant_policy

                async def complete(tiers: list[str]) -> PoolResult:
                    # the cascade chose the next tier: demand there (it may be cold)
                    metrics.TIER_DEMAND_TOTAL.labels(tiers[0]).inc()
                    return await self.pools.complete(tiers, payload, deadline=deadline)

                run = await run_cascade(
                    result,
                    route.cascade,
                    complete,
                    lambda tier: higher_tiers(tier, names, tp),
                )
                result, answers = run.result, run.answers
                features = {**decision.features, "cascade": run.info}
                decision = dataclasses.replace(decision, features=features)
            body = result.body
            choice, content = _first_choice(body, result.tier)
        except BaseException as exc:
            self._finish(req, decision, tier=decision.tier, exc=exc)
            raise
        finally:
            gauge.dec()
        usage = Usage.from_openai(body.get("usage"))
        self._finish(req, decision, tier=result.tier, answers=answers, usage=usage)
        return ChatResult(
            request_id=req.request_id,
            tier=result.tier,
            feedback_token=token,
            model=result.tier,
            created=int(body.get("created") or time.time()),
            content=content,
            finish_reason=choice.get("finish_reason"),
            usage=usage,
            logprobs=choice.get("logprobs") if req.logprobs else None,
        )

    async def chat_stream(self, req: ChatRequest) -> _CoreStream:
        route, token, gauge = self._begin(req)
        try:
            upstream = await self._stream(route, _payload(req), self._deadline(req))
        except BaseException as exc:
            gauge.dec()
            self._finish(req, route.decision, tier=route.decision.tier, exc=exc)
            raise
        return _CoreStream(self, req, route.decision, upstream, token)

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

    def _tenant_policy(self, req: ChatRequest) -> TenantPolicy:
        return self.tenant_policies.snapshot.lookup(req.tenant)

    def _begin(self, req: ChatRequest) -> tuple[_Route, str, Any]:
        """Decide, count the request in flight on its tier, and sign its feedback token."""
        route = self._decide(req)
        gauge = metrics.REQUESTS_INFLIGHT.labels(route.decision.tier)
        gauge.inc()
        return route, self.tokens.issue(req.request_id, req.tenant), gauge

    def _decide(self, req: ChatRequest) -> _Route:
        """The policy's choice under the tenant's policy, and the tiers to try in order.

        The tenant's allowed tiers bound both: a pin outside them is refused (403), an
        auto-routed choice outside them moves to the nearest allowed tier (upward first),
        and fallback never leaves them. The session floor and the quality floor bound the
        auto-routed choice and its fallback (see the module docstring).
        """
        t0 = time.perf_counter()
        catalog = self.catalog.snapshot
        tp = self._tenant_policy(req)
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
        previous = self.sessions.get(req.tenant, req.session_id) if req.session_id else None
        decision = self.policy.select(
            DecisionContext(request=req, catalog=catalog, tenant_policy=tp, previous_tier=previous)
        )
        tier = clamp_tier(decision.tier, catalog.names, tp)
        if tier is None:
            raise NoEligiblePool(
                f"none of the tiers allowed for tenant {req.tenant!r} "
                f"({', '.join(tp.allowed_tiers)}) is in the catalog ({', '.join(catalog.names)})",
                retry_after_s=self.settings.pool_client.breaker_reset_s,
            )
        features = {**decision.features, "tenant_policy": tp.summary()}
        reason = decision.reason
        if tier != decision.tier:
            reason = f"{reason}; {decision.tier} not allowed, nearest allowed {tier}"
        names = catalog.names
        session_floor: str | None = None
        if req.session_id:
            session: dict[str, Any] = {
                "key": session_key(req.tenant, req.session_id),
                "previous_tier": previous,
                "floor_tier": None,
                "floor_applied": False,
            }
            if previous is not None and not req.pinned and not tp.allow_session_downgrade:
                session_floor = _session_floor(previous, names, tp)
                session["floor_tier"] = session_floor
                if session_floor is not None and names.index(tier) < names.index(session_floor):
                    reason = f"{reason}; session floor: previous turn answered at {previous}"
                    tier = session_floor
                    session["floor_applied"] = True
            features["session"] = session
        cascade = tp.cascade
        if cascade is not None and (req.pinned or req.stream):
            skipped = "pinned" if req.pinned else "stream"
            features["cascade"] = {"threshold": cascade.threshold, "skipped": skipped}
            cascade = None
        floor = tp.quality_floor if decision.predicted and tp.quality_floor > 0 else None
        excluded: dict[str, str] = {}
        if req.pinned or not self.settings.pool_client.fallback:
            tiers = [tier]
        else:
            tiers = [tier]
            for t in catalog.fallback_order(tier)[1:]:
                if not tp.allows(t):
                    continue
                why = _below_floors(t, names, session_floor, previous, floor, decision.predicted)
                if why is None:
                    tiers.append(t)
                else:
                    excluded[t] = why
            if excluded:
                features["fallback_excluded"] = excluded
        if tier != decision.tier:  # the tier the policy drew (its propensity is of that one)
            features["policy_tier"] = decision.tier
        decision = dataclasses.replace(decision, tier=tier, reason=reason, features=features)
        metrics.TIER_DEMAND_TOTAL.labels(tier).inc()  # demand, before any fallback
        metrics.DECISION_SECONDS.observe(time.perf_counter() - t0)
        return _Route(decision, tiers, excluded, cascade, tp)

    async def _complete(
        self, route: _Route, payload: dict[str, Any], deadline: float
    ) -> PoolResult:
        try:
            return await self.pools.complete(route.tiers, payload, deadline=deadline)
        except NoEligiblePool as exc:
            raise _refusal(route, exc) from None

    async def _stream(self, route: _Route, payload: dict[str, Any], deadline: float) -> PoolStream:
        try:
            return await self.pools.stream(route.tiers, payload, deadline=deadline)
        except NoEligiblePool as exc:
            raise _refusal(route, exc) from None

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
        answers: Sequence[PoolResult] = (),
    ) -> None:
        """Count the request and hand its decision record to the writer (never raises).

        ``answers``: every pool answer of a non-streamed request, first first (more than one
        after a cascade escalated); their cost weights, pool time and tokens add up.
        """
        total_s = time.perf_counter() - req.received_at
        if exc is None:
            outcome, error = "ok", None
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
            outcome, error = "cancelled", "client disconnected"
        elif isinstance(exc, FovealError):
            outcome, error = "error", f"{type(exc).__name__}: {exc.message}"
        else:
            outcome, error = "error", f"{type(exc).__name__}: {exc}"
        first_tier, cost_tiers = tier, [tier]
        prompt_tokens = usage.prompt_tokens if usage else None
        completion_tokens = usage.completion_tokens if usage else None
        if answers:
            first_tier, cost_tiers = answers[0].tier, [a.tier for a in answers]
            pool_s = sum(a.latency_s for a in answers)
            if len(answers) > 1:
                prompt_tokens, completion_tokens = _token_sums(answers)
        metrics.REQUESTS_TOTAL.labels(req.edge, tier, outcome).inc()
        if outcome == "ok":
            metrics.REQUEST_SECONDS.labels(tier).observe(total_s)
            if first_tier != decision.tier:
                metrics.POOL_FALLBACKS_TOTAL.labels(decision.tier).inc()
            if req.session_id:
                self.sessions.put(req.tenant, req.session_id, tier)
        if pool_s is not None:
            metrics.GATEWAY_OVERHEAD_SECONDS.labels(req.edge).observe(max(0.0, total_s - pool_s))
        cost: float | None = None
        if outcome == "ok":
            catalog = self.catalog.snapshot
            weights = [t.cost_weight for t in map(catalog.get, cost_tiers) if t is not None]
            cost = sum(weights) if weights else None
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
            cost=cost,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
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
    summary.update(decision.features)  # with "session" for a request of a session
    return summary


def _session_floor(previous: str, names: Sequence[str], policy: TenantPolicy) -> str | None:
    """The lowest tier a session's next auto turn may use: its previous answering tier, or the
    nearest allowed tier above it; None when that tier left the catalog or none is allowed."""
    if previous not in names:
        return None
    i = list(names).index(previous)
    return next((t for t in names[i:] if policy.allows(t)), None)


def _below_floors(
    tier: str,
    names: Sequence[str],
    session_floor: str | None,
    previous: str | None,
    floor: float | None,
    predicted: dict[str, float],
) -> str | None:
    """Why ``tier`` may not answer as a fallback (None: it may)."""
    if session_floor is not None and names.index(tier) < names.index(session_floor):
        return f"below the session floor {session_floor} (previous turn answered at {previous})"
    if floor is not None:
        p = predicted.get(tier)
        if p is None:
            return f"no predicted P(correct) to check against the quality floor {floor:g}"
        if p < floor:
            return f"predicted P(correct) {p:.3g} is below the quality floor {floor:g}"
    return None


def _refusal(route: _Route, exc: NoEligiblePool) -> NoEligiblePool:
    """The pools' 503, naming the tiers the floors kept out (the same error when none were)."""
    if not route.excluded:
        return exc
    left_out = "; ".join(f"{t}: {why}" for t, why in route.excluded.items())
    tried = ", ".join(route.tiers)
    return NoEligiblePool(
        f"no tier that meets this request's floors can answer now: {exc.message}. Tiers "
        f"tried: {tried}. Not tried: {left_out}. Retry after the Retry-After interval.",
        retry_after_s=exc.retry_after_s,
        code="no_tier_meets_floor",
    )


def _token_sums(answers: Sequence[PoolResult]) -> tuple[int | None, int | None]:
    """Prompt and completion tokens over every answer (None when no answer reported them)."""
    prompt = completion = 0
    seen = False
    for answer in answers:
        raw = answer.body.get("usage")
        usage = Usage.from_openai(raw) if isinstance(raw, dict) else None
        if usage is not None:
            seen = True
            prompt += usage.prompt_tokens
            completion += usage.completion_tokens
    return (prompt, completion) if seen else (None, None)
