"""Benchmarks that hold the agent and the collector to their performance targets (issue 7).

Every benchmark talks only to loopback addresses (127.0.0.0/8), bounds every loop in count
and time, and prints a small table. Run one with ``python -m bench NAME`` or all of them with
``python -m bench all --quick``; docs/PERFORMANCE.md has the figures and the commands.
"""
