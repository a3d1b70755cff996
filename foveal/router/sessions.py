"""The tier that answered each session's previous turn, kept in memory (LRU + TTL).

Compression hurts multi-turn use: the previous answer was written from a view of the image at
some tier, and a next turn that sees the image at fewer visual tokens may contradict it. The
core therefore passes a session's previous answering tier to the policy
(``DecisionContext.previous_tier``) and, unless the tenant policy sets
``allow_session_downgrade``, never routes the session's next auto-routed turn below it.

Why memory only, and not a store lookup on a miss: the decisions table has no session column,
so finding a session's latest decision would scan JSON features on the request path (the
request path reads only in-memory snapshots; the store is written in batches behind it). The
map is per router replica: with several replicas, route a session's turns to one replica
(e.g. consistent hashing on the ``x-foveal-session-id`` header) or the floor holds only
where the session was seen. A forgotten session (evicted, expired, other replica) is routed
like a new one, and its decision record says so (``features["session"]["previous_tier"]``
is null).

The request path runs on one event loop, so no lock is taken.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["MAX_SESSION_ID_CHARS", "SessionTiers", "session_key"]

MAX_SESSION_ID_CHARS = 256


def session_key(tenant: str, session_id: str) -> str:
    """A short, stable id of a session for decision records (the raw id is not recorded)."""
    digest = hashlib.sha256(f"{tenant}\0{session_id}".encode()).hexdigest()
    return digest[:16]


class SessionTiers:
    """(tenant, session id) -> the tier that answered the session's latest turn.

    Bounded: at most ``max_sessions`` entries, least recently used evicted first; an entry not
    touched for ``ttl_s`` seconds is gone. The clock is injectable for tests.
    """

    def __init__(
        self,
        max_sessions: int,
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, tenant: str, session_id: str) -> str | None:
        """The session's last answering tier, or None when unknown or expired."""
        key = (tenant, session_id)
        entry = self._entries.get(key)
        if entry is None:
            return None
        tier, seen = entry
        if self._clock() - seen > self.ttl_s:
            del self._entries[key]
            return None
        return tier

    def put(self, tenant: str, session_id: str, tier: str) -> None:
        """Remember that ``tier`` answered the session's latest turn."""
        key = (tenant, session_id)
        now = self._clock()
        entries = self._entries
        entries[key] = (tier, now)
        entries.move_to_end(key)
        while len(entries) > self.max_sessions:
            entries.popitem(last=False)
        # Drop expired entries from the cold end (amortised O(1) per put).
        for _ in range(2):
            if not entries:
                break
            oldest_key, (_, seen) = next(iter(entries.items()))
            if now - seen <= self.ttl_s:
                break
            del entries[oldest_key]
