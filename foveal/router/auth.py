"""API key -> tenant, with a short in-memory cache so the hot path rarely touches the store."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass

from foveal.config import AuthSettings
from foveal.errors import Unauthenticated
from foveal.store import Store

__all__ = ["Authenticator", "TenantInfo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TenantInfo:
    name: str
    max_tokens_cap: int | None


class Authenticator:
    def __init__(self, store: Store, settings: AuthSettings) -> None:
        self._store = store
        self._settings = settings
        self._keys: dict[str, tuple[float, TenantInfo]] = {}  # sha256(key) -> (expires, tenant)
        self._tenants: dict[str, TenantInfo] = {}

    @property
    def enabled(self) -> bool:
        return self._settings.enabled

    async def start(self) -> None:
        if not self.enabled:
            log.warning(
                "auth is DISABLED: every request runs as tenant %r (use --auth in production)",
                self._settings.default_tenant,
            )
            rec = await asyncio.to_thread(self._store.ensure_tenant, self._settings.default_tenant)
            self._tenants[rec.name] = TenantInfo(rec.name, rec.max_tokens_cap)

    def tenant_info(self, name: str) -> TenantInfo:
        return self._tenants.get(name) or TenantInfo(name, None)

    async def authenticate(self, api_key: str | None) -> str:
        """The tenant of ``api_key``; raises Unauthenticated when auth is on and it is bad."""
        if not self.enabled:
            return self._settings.default_tenant
        if not api_key:
            raise Unauthenticated(
                "missing API key: send `Authorization: Bearer <key>`", code="missing_api_key"
            )
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        now = time.monotonic()
        hit = self._keys.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1].name
        rec = await asyncio.to_thread(self._store.tenant_for_key, api_key)
        if rec is None:
            self._keys.pop(digest, None)
            raise Unauthenticated("invalid API key", code="invalid_api_key")
        info = TenantInfo(rec.name, rec.max_tokens_cap)
        self._tenants[info.name] = info
        if self._settings.key_cache_ttl_s > 0:
            self._keys[digest] = (now + self._settings.key_cache_ttl_s, info)
        return info.name
