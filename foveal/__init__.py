"""Foveal: route each vision-language request to the cheapest visual-token tier that answers it."""

__version__ = "0.1.0"
__all__ = ["__version__"]
