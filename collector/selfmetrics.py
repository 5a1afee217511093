"""The collector's own counters: what it received, stored, refused and how fast it acked.

Children are bound once here, so the hot path (one batch) costs a few
attribute increments, not label lookups.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SelfMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        batches = Counter(
            "takedown_collector_batches",
            "Result batches received from agents, by outcome (acked, not stored, or so far over"
            " the agent's result rate that it would wait longer than the limit allows: no ack)",
            ["outcome"],
            registry=registry,
        )
        self.batches_acked = batches.labels("acked")
        self.batches_failed = batches.labels("not_stored")
        self.batches_limited = batches.labels("rate_limited")
        self.batches_delayed = Counter(
            "takedown_collector_batches_delayed",
            "Result batches over the agent's result rate, stored and acknowledged late",
            registry=registry,
        )
        self.rate_limit_wait = Counter(
            "takedown_collector_rate_limit_wait_seconds",
            "Time batches over the agent's result rate waited before being stored",
            registry=registry,
        )
        results = Counter(
            "takedown_collector_results",
            "Results in received batches: stored, duplicate (redelivered, already stored),"
            " rejected (URL unknown or not active) or invalid (failed validation)",
            ["outcome"],
            registry=registry,
        )
        self.stored = results.labels("stored")
        self.duplicates = results.labels("duplicate")
        self.rejected = results.labels("rejected")
        self.invalid = results.labels("invalid")
        self.signatures_failed = Counter(
            "takedown_collector_bad_signatures",
            "Batches refused because their signature did not verify against their agent's"
            " pinned key (the stream ends; nothing of the batch is stored)",
            registry=registry,
        )
        self.ack_seconds = Histogram(
            "takedown_collector_ack_seconds",
            "From a batch's arrival to its acknowledgement (commit included)",
            buckets=ACK_BUCKETS,
            registry=registry,
        )
        sessions = Counter(
            "takedown_collector_agent_streams",
            "Agent streams, by how they ended (opened counts every hello)",
            ["event"],
            registry=registry,
        )
        self.streams_opened = sessions.labels("opened")
        self.streams_closed = sessions.labels("closed")
        self.streams_refused = sessions.labels("refused")
        self.assignment_sent = Counter(
            "takedown_collector_assignment_targets_sent",
            "Targets sent to agents in assignment updates (reconciles and changes)",
            registry=registry,
        )
        reports = Counter(
            "takedown_collector_reports",
            "Reports submitted over the intake service, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.reports_accepted = reports.labels("accepted")
        self.reports_known = reports.labels("already_known")
        self.reports_rejected = reports.labels("rejected")
        self.store_errors = Counter(
            "takedown_collector_store_errors",
            "Writes the database refused (disk full, unwritable): nothing was acknowledged",
            registry=registry,
        )
        self.streams = Gauge(
            "takedown_collector_agent_streams_open",
            "Agent streams open now",
            registry=registry,
        )
        self.auth_refusals = Counter(
            "takedown_collector_auth_refusals",
            "Calls refused by authentication or authorisation, by reason (missing, malformed,"
            " unknown, revoked, wrong_role, name_mismatch, network_mismatch, cert_mismatch,"
            " no_rule)",
            ["reason"],
            registry=registry,
        )
