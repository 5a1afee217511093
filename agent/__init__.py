"""Takedown Monitor agent: probes assigned URLs and streams results to the collector."""

__version__ = "0.1.0"
