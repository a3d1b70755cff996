"""What a tier is, and the immutable catalog of tiers the request path reads.

The request path only ever reads ``CatalogHolder.snapshot``; watchers (the config loader now,
the Kubernetes watcher later) build a new :class:`Catalog` and swap it in atomically.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from foveal.config import TierSettings

__all__ = ["Catalog", "CatalogHolder", "Endpoint", "Tier"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str  # base URL, no trailing slash, e.g. http://127.0.0.1:9001
    model: str


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    visual_tokens: int
    cost_weight: float
    backend: str
    model: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Catalog:
    """Tiers sorted by visual-token budget, cheapest first."""

    tiers: tuple[Tier, ...]
    _by_name: dict[str, Tier] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.tiers, key=lambda t: (t.visual_tokens, t.name)))
        object.__setattr__(self, "tiers", ordered)
        object.__setattr__(self, "_by_name", {t.name: t for t in ordered})

    @classmethod
    def from_settings(cls, tiers: Iterable[TierSettings]) -> Catalog:
        return cls(
            tuple(
                Tier(
                    name=t.name,
                    visual_tokens=t.visual_tokens,
                    cost_weight=t.cost_weight,
                    backend=t.backend,
                    model=t.model,
                    endpoints=tuple(
                        Endpoint(url=e.url.rstrip("/"), model=e.model or t.model)
                        for e in t.endpoints
                    ),
                )
                for t in tiers
            )
        )

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tiers]

    def get(self, name: str) -> Tier | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def fallback_order(self, name: str) -> list[str]:
        """``name`` first, then higher tiers nearest first, then lower tiers nearest first."""
        names = self.names
        i = names.index(name)
        return [names[i], *names[i + 1 :], *reversed(names[:i])]


class CatalogHolder:
    """Holds the current catalog; replacing it is one reference assignment (atomic)."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    @property
    def snapshot(self) -> Catalog:
        return self._catalog

    def replace(self, catalog: Catalog) -> None:
        self._catalog = catalog
