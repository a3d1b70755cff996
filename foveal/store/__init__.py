"""Foveal's persistent state: decisions, feedback, tenants and API keys (SQLite or PostgreSQL).

``Store`` is the blocking API; ``DecisionWriter`` batches decision writes off the request path.
"""

from foveal.store.records import ApiKeyInfo, DecisionRecord, FeedbackRecord, TenantRecord
from foveal.store.store import Store
from foveal.store.writer import DecisionWriter

__all__ = [
    "ApiKeyInfo",
    "DecisionRecord",
    "DecisionWriter",
    "FeedbackRecord",
    "Store",
    "TenantRecord",
]
