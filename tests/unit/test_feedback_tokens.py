from __future__ import annotations

import pytest

from foveal.errors import PermissionDenied
from foveal.router.feedback_tokens import FeedbackTokens


def test_round_trip() -> None:
    tokens = FeedbackTokens("secret", ttl_s=60)
    tokens.verify(tokens.issue("req_1", "acme"), "req_1", "acme")


@pytest.mark.parametrize(("rid", "tenant"), [("req_2", "acme"), ("req_1", "other")])
def test_bound_to_request_and_tenant(rid: str, tenant: str) -> None:
    tokens = FeedbackTokens("secret", ttl_s=60)
    with pytest.raises(PermissionDenied, match="does not match"):
        tokens.verify(tokens.issue("req_1", "acme"), rid, tenant)


def test_expiry() -> None:
    tokens = FeedbackTokens("secret", ttl_s=60)
    token = tokens.issue("req_1", "acme", now=1000.0)
    tokens.verify(token, "req_1", "acme", now=1059.0)
    with pytest.raises(PermissionDenied, match="expired"):
        tokens.verify(token, "req_1", "acme", now=1061.0)


def test_tampered_expiry_is_rejected() -> None:
    tokens = FeedbackTokens("secret", ttl_s=60)
    expiry, sig = tokens.issue("req_1", "acme", now=1000.0).split(".")
    with pytest.raises(PermissionDenied):
        tokens.verify(f"{int(expiry) + 10**6}.{sig}", "req_1", "acme", now=1000.0)


@pytest.mark.parametrize("bad", ["", "abc", "123.", ".sig", "12a.sig"])
def test_malformed(bad: str) -> None:
    with pytest.raises(PermissionDenied):
        FeedbackTokens("s", 60).verify(bad, "req_1", "acme")


def test_keys_differ_between_secrets() -> None:
    token = FeedbackTokens("one", 60).issue("req_1", "acme")
    with pytest.raises(PermissionDenied):
        FeedbackTokens("two", 60).verify(token, "req_1", "acme")
