"""Signed feedback tokens: bound to one request id and tenant, expiring, single use.

A token is ``<expiry>.<signature>`` where the signature is HMAC-SHA256 over
``request_id|tenant|expiry``. Single use is enforced by the store (one feedback row per
request id), so a token stays single use across router replicas that share a store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from foveal.errors import PermissionDenied

__all__ = ["FeedbackTokens"]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class FeedbackTokens:
    def __init__(self, secret: str, ttl_s: int) -> None:
        self._key = secret.encode() if secret else secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def _sign(self, request_id: str, tenant: str, expiry: int) -> str:
        msg = f"{request_id}|{tenant}|{expiry}".encode()
        return _b64(hmac.new(self._key, msg, hashlib.sha256).digest())

    def issue(self, request_id: str, tenant: str, *, now: float | None = None) -> str:
        expiry = int((time.time() if now is None else now) + self.ttl_s)
        return f"{expiry}.{self._sign(request_id, tenant, expiry)}"

    def verify(self, token: str, request_id: str, tenant: str, *, now: float | None = None) -> None:
        """Raise PermissionDenied unless ``token`` was issued for this request and tenant and
        has not expired."""
        expiry_text, _, signature = token.partition(".")
        if not expiry_text.isdigit() or not signature:
            raise PermissionDenied("malformed feedback token", param="token", code="bad_token")
        expiry = int(expiry_text)
        expected = self._sign(request_id, tenant, expiry)
        if not hmac.compare_digest(expected, signature):
            raise PermissionDenied(
                "feedback token does not match this request and tenant",
                param="token",
                code="bad_token",
            )
        if (time.time() if now is None else now) > expiry:
            raise PermissionDenied("feedback token expired", param="token", code="expired_token")
