"""Takedown Monitor collector: stores agent results, decides removals, exports metrics."""

__version__ = "0.1.0"
