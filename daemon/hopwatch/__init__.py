"""hopwatch: where distributed-tracing context breaks, seen from the kernel."""

from __future__ import annotations

__all__ = ["__version__"]
__version__ = "0.1.0"
