"""The Kubernetes operator (ModelPool / RoutingPolicy). Arrives with the Kubernetes issue."""

__all__: list[str] = []
