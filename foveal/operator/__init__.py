"""The Kubernetes operator: ModelPool -> Deployment/Service/PDB + status + autoscaling from
router demand; RoutingPolicy -> validation and ``status.accepted``. See docs/operator.md."""

__all__: list[str] = []
