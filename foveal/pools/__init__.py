"""The pools: the tier catalog and the client that sends chat completions to pool endpoints."""

from foveal.pools.breaker import CircuitBreaker
from foveal.pools.catalog import Catalog, CatalogHolder, Endpoint, Tier
from foveal.pools.client import PoolClient, PoolResult
from foveal.pools.stream import PoolStream

__all__ = [
    "Catalog",
    "CatalogHolder",
    "CircuitBreaker",
    "Endpoint",
    "PoolClient",
    "PoolResult",
    "PoolStream",
    "Tier",
]
