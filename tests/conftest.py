"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from foveal.testing.stack import LocalStack, running_stack


@pytest.fixture
async def stack() -> AsyncIterator[LocalStack]:
    """The whole local stack on loopback port 0: fake pools, gateway, gRPC, SQLite store."""
    async with running_stack() as s:
        yield s
