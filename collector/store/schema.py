"""The collector's schema, as an ordered list of migrations, for SQLite and PostgreSQL.

The DDL is SQLite's; on PostgreSQL each statement's types are mapped (sql.pg_ddl).

Times are REAL Unix seconds (UTC). Per-URL verdict state lives in url_state;
every stored probe result in results, keyed by (agent_id, seq) so that a
batch delivered twice is stored once.
"""

from __future__ import annotations

from collector.store.evidence import BATCHES as EVIDENCE_BATCHES
from collector.store.evidence import SCHEMA as EVIDENCE_SCHEMA
from collector.store.shards import SHARDS
from collector.store.sql import Database, Migrations

migrations = Migrations("takedown.collector")


def _run(db: Database, script: str) -> None:
    """Run a script statement by statement, inside the migration's transaction."""
    for statement in script.split(";"):
        if statement.strip():
            db.ddl(statement)


@migrations()
def m001_initial(db: Database) -> None:
    _run(
        db,
        """
        CREATE TABLE agents (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            network TEXT NOT NULL,
            version TEXT NOT NULL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            last_result_at REAL,
            clock_offset REAL
        );
        CREATE TABLE urls (
            id INTEGER PRIMARY KEY,
            url TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            active INTEGER NOT NULL DEFAULT 1,
            interval REAL
        );
        CREATE TABLE reports (
            id INTEGER PRIMARY KEY,
            url_id INTEGER NOT NULL REFERENCES urls(id),
            reference TEXT UNIQUE,
            notified_at REAL NOT NULL,
            received_at REAL,
            submitted_at REAL NOT NULL,
            sha256 BLOB,
            order_issued_at REAL,
            order_deadline REAL,
            origin_ip TEXT
        );
        CREATE INDEX reports_url ON reports(url_id, notified_at);
        CREATE TABLE url_state (
            url_id INTEGER PRIMARY KEY REFERENCES urls(id),
            state TEXT NOT NULL,
            notified_at REAL NOT NULL,
            order_issued_at REAL,
            order_deadline REAL,
            origin_ip TEXT,
            baseline BLOB,
            provider TEXT NOT NULL DEFAULT 'unattributed',
            asn INTEGER,
            cdn INTEGER NOT NULL DEFAULT 0,
            dynamic INTEGER NOT NULL DEFAULT 0,
            episode INTEGER NOT NULL DEFAULT 1,
            last_present_at REAL,
            removal_last_present_at REAL,
            removal_first_removed_at REAL,
            removal_confirmed_at REAL,
            removal_latency REAL,
            removal_nxdomain INTEGER NOT NULL DEFAULT 0,
            removed_at REAL,
            reappearances INTEGER NOT NULL DEFAULT 0,
            memory TEXT NOT NULL DEFAULT '{}',
            updated_at REAL NOT NULL
        );
        CREATE INDEX url_state_provider ON url_state(provider, state);
        CREATE TABLE episodes (
            url_id INTEGER NOT NULL REFERENCES urls(id),
            episode INTEGER NOT NULL,
            opened_at REAL NOT NULL,
            last_present_at REAL,
            first_removed_at REAL,
            confirmed_at REAL,
            latency REAL,
            nxdomain INTEGER NOT NULL DEFAULT 0,
            provider TEXT,
            PRIMARY KEY (url_id, episode)
        ) WITHOUT ROWID;
        CREATE TABLE url_events (
            url_id INTEGER NOT NULL REFERENCES urls(id),
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            detail TEXT NOT NULL
        );
        CREATE INDEX url_events_url ON url_events(url_id, at);
        CREATE TABLE results (
            agent_id INTEGER NOT NULL REFERENCES agents(id),
            seq INTEGER NOT NULL,
            url_id INTEGER NOT NULL REFERENCES urls(id),
            started_at REAL NOT NULL,
            elapsed REAL NOT NULL,
            status INTEGER NOT NULL,
            final_url TEXT NOT NULL,
            sha256 BLOB,
            body_bytes INTEGER NOT NULL,
            truncated INTEGER NOT NULL,
            peer_ip TEXT NOT NULL,
            error TEXT NOT NULL,
            redirects INTEGER NOT NULL,
            challenge INTEGER NOT NULL DEFAULT 0,
            clock_suspect INTEGER NOT NULL DEFAULT 0,
            class TEXT NOT NULL,
            provider TEXT NOT NULL,
            asn INTEGER,
            stored_at REAL NOT NULL,
            PRIMARY KEY (agent_id, seq)
        ) WITHOUT ROWID;
        CREATE INDEX results_url ON results(url_id, started_at);
        CREATE TABLE result_counts (
            agent_id INTEGER NOT NULL REFERENCES agents(id),
            class TEXT NOT NULL,
            n INTEGER NOT NULL,
            PRIMARY KEY (agent_id, class)
        ) WITHOUT ROWID;
        """,
    )


@migrations()
def m002_credentials(db: Database) -> None:
    """Bearer tokens of agents and hotlines (intake), stored as SHA-256 digests only."""
    _run(
        db,
        """
        CREATE TABLE credentials (
            id INTEGER PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('agent', 'intake')),
            name TEXT NOT NULL,
            network TEXT,
            token_id TEXT NOT NULL UNIQUE,
            token_sha256 BLOB NOT NULL,
            created_at REAL NOT NULL,
            revoked_at REAL
        );
        CREATE UNIQUE INDEX credentials_live_name ON credentials(role, name)
            WHERE revoked_at IS NULL;
        """,
    )


@migrations()
def m003_witness_fold(db: Database) -> None:
    """The event-time fold: per-result TLS and CDN, per-hotline references, fold bookkeeping.

    Verdicts folded under an earlier method keep `method = ''` until `refold` (or the first
    start of this version, which refolds them) recomputes them from the stored results.
    """
    _run(
        db,
        """
        ALTER TABLE results ADD COLUMN tls INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE results ADD COLUMN cdn INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE reports_v3 (
            id INTEGER PRIMARY KEY,
            url_id INTEGER NOT NULL REFERENCES urls(id),
            source TEXT NOT NULL DEFAULT '',
            reference TEXT,
            notified_at REAL NOT NULL,
            received_at REAL,
            submitted_at REAL NOT NULL,
            sha256 BLOB,
            order_issued_at REAL,
            order_deadline REAL,
            origin_ip TEXT,
            UNIQUE (source, reference)
        );
        INSERT INTO reports_v3 (id, url_id, reference, notified_at, received_at, submitted_at,
            sha256, order_issued_at, order_deadline, origin_ip)
            SELECT id, url_id, reference, notified_at, received_at, submitted_at, sha256,
            order_issued_at, order_deadline, origin_ip FROM reports;
        DROP TABLE reports;
        ALTER TABLE reports_v3 RENAME TO reports;
        CREATE INDEX reports_url ON reports(url_id, notified_at);
        ALTER TABLE url_state ADD COLUMN method TEXT NOT NULL DEFAULT '';
        ALTER TABLE url_state ADD COLUMN opened_at REAL;
        ALTER TABLE url_state ADD COLUMN live_until REAL;
        ALTER TABLE url_state ADD COLUMN last_conclusive_at REAL;
        ALTER TABLE url_state ADD COLUMN removal_observed_present INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE url_state ADD COLUMN first_provider TEXT;
        ALTER TABLE url_state ADD COLUMN truncated_vs_reference INTEGER NOT NULL DEFAULT 0;
        UPDATE url_state SET opened_at = notified_at, first_provider = provider;
        DROP INDEX url_state_provider;
        CREATE INDEX url_state_provider ON url_state(first_provider, state);
        ALTER TABLE episodes ADD COLUMN observed_present INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE episodes ADD COLUMN opened_by TEXT NOT NULL DEFAULT 'notice';
        CREATE TABLE reappearance_log (
            url_id INTEGER NOT NULL REFERENCES urls(id),
            episode INTEGER NOT NULL,
            provider TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (url_id, episode)
        ) WITHOUT ROWID;
        """,
    )


@migrations()
def m004_result_country(db: Database) -> None:
    """The country of the address each result came from (prefix table or country database),
    so the report can say where a provider served the content."""
    _run(db, "ALTER TABLE results ADD COLUMN country TEXT")


@migrations()
def m005_refold_pending(db: Database) -> None:
    """URLs holding a result older than their fold's tail: refolded within seconds, or at start."""
    _run(db, "ALTER TABLE url_state ADD COLUMN refold_pending INTEGER NOT NULL DEFAULT 0")


@migrations()
def m006_evidence(db: Database) -> None:
    """The evidence log (leaves, tree nodes, checkpoints), pinned agent keys, and the verdicts
    already logged (so a refold that decides the same again logs nothing new)."""
    _run(db, EVIDENCE_SCHEMA)
    _run(
        db,
        """
        CREATE TABLE agent_keys (
            name TEXT PRIMARY KEY,
            public_key BLOB NOT NULL,
            source TEXT NOT NULL,  -- 'hello' (pinned at first hello) or 'agents add'
            accepted_at REAL NOT NULL,
            leaf INTEGER  -- its agent_key leaf in the evidence log, once logged
        );
        CREATE TABLE log_verdicts (
            url_id INTEGER NOT NULL,
            key TEXT NOT NULL,
            PRIMARY KEY (url_id, key)
        ) WITHOUT ROWID
        """,
    )


@migrations()
def m007_unflushed(db: Database) -> None:
    """URLs folded since their url_state row was last written (write-behind): a crash before
    the next flush refolds them at start."""
    _run(db, "CREATE TABLE unflushed (url_id INTEGER PRIMARY KEY)")


@migrations()
def m008_fold_checkpoints(db: Database) -> None:
    """url_state rows as checkpoints: how many results each folded (-1: not known, a refold at
    the next start after a crash), and the highest seq of each agent a flush covered."""
    _run(db, "ALTER TABLE url_state ADD COLUMN folded INTEGER NOT NULL DEFAULT -1")
    _run(db, "CREATE TABLE fold_marks (agent_id INTEGER PRIMARY KEY, seq INTEGER NOT NULL)")


@migrations()
def m009_start_cheaply(db: Database) -> None:
    """What a start reads without scanning: whether the last stop was clean (then the
    integrity check, a read of the whole file, is skipped), URLs with a refold due, and URLs
    folded by another method version."""
    _run(db, "CREATE TABLE lifecycle (id INTEGER PRIMARY KEY CHECK (id = 1), clean_stop INTEGER"
             " NOT NULL)")  # fmt: skip
    _run(db, "INSERT INTO lifecycle (id, clean_stop) VALUES (1, 0)")
    _run(db, "CREATE INDEX url_state_refold_due ON url_state(url_id) WHERE refold_pending = 1")
    _run(db, "CREATE INDEX url_state_method ON url_state(method)")


@migrations()
def m010_result_leaves(db: Database) -> None:
    """Each stored result's observation leaf in the evidence log (NULL without a log key), so a
    verdict leaf can name the observations it rests on (its `basis`) by log index."""
    _run(db, "ALTER TABLE results ADD COLUMN leaf INTEGER")


@migrations()
def m011_signed_batches(db: Database) -> None:
    """Evidence v2: agents sign each batch once, over a Merkle tree of its observations; the
    tree's leaf hashes are kept beside the batch leaf, for the proofs an export gives."""
    _run(db, EVIDENCE_BATCHES)


@migrations()
def m012_event_order(db: Database) -> None:
    """A URL's timeline lists events of the same time in the order they were written: SQLite
    keeps that order in `rowid`; PostgreSQL gets a column of that name doing the same."""
    if db.postgres:
        db.conn.execute(
            "ALTER TABLE url_events ADD COLUMN rowid BIGINT GENERATED ALWAYS AS IDENTITY"
        )


@migrations()
def m013_shards(db: Database) -> None:
    """Several collectors on one PostgreSQL database (collector/store/shards.py): a lease per
    URL shard, the collectors that hold them, the stored results waiting for the holder of
    their shard to fold them, and the URLs whose assignment changed (new, replanned,
    retired), which every collector pushes to its own agents. A SQLite file has one
    collector: the tables stay empty."""
    _run(
        db,
        """
        CREATE TABLE shard_leases (
            shard INTEGER PRIMARY KEY,
            owner TEXT,
            epoch INTEGER NOT NULL DEFAULT 0,
            expires_at REAL NOT NULL DEFAULT 0
        );
        CREATE TABLE collectors (
            name TEXT PRIMARY KEY,
            seen_at REAL NOT NULL
        );
        CREATE TABLE fold_queue (
            shard INTEGER NOT NULL,
            agent_id INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            PRIMARY KEY (agent_id, seq)
        );
        CREATE INDEX fold_queue_shard ON fold_queue(shard);
        CREATE TABLE assignment_log (
            id INTEGER PRIMARY KEY,
            url_id INTEGER NOT NULL,
            writer TEXT NOT NULL DEFAULT ''  -- the collector that made the change
        )
        """,
    )
    for shard in range(SHARDS):
        db.conn.execute("INSERT INTO shard_leases (shard) VALUES (?)", (shard,))


RESULT_PARTITIONS = 16  # PostgreSQL: results hash-partitioned by url_id


@migrations()
def m014_partitioned_results(db: Database) -> None:
    """PostgreSQL: results hash-partitioned by url_id, so that a shard's reads (its refolds,
    its queue) and vacuum stay within a few partitions however many results there are.

    A partitioned table's primary key must hold the partition key, so it is (agent_id, seq,
    url_id): a batch delivered twice (the same results) is still refused by it, whichever
    collector took it first. SQLite keeps its table: one file, one writer."""
    if not db.postgres:
        return
    c = db.conn
    c.execute("CREATE TABLE results_p (LIKE results INCLUDING DEFAULTS) PARTITION BY HASH (url_id)")
    for n in range(RESULT_PARTITIONS):
        c.execute(
            f"CREATE TABLE results_p{n} PARTITION OF results_p"
            f" FOR VALUES WITH (MODULUS {RESULT_PARTITIONS}, REMAINDER {n})"
        )
    c.execute("ALTER TABLE results_p ADD PRIMARY KEY (agent_id, seq, url_id)")
    c.execute("INSERT INTO results_p SELECT * FROM results")
    c.execute("DROP TABLE results")
    c.execute("ALTER TABLE results_p RENAME TO results")
    c.execute("CREATE INDEX results_url ON results(url_id, started_at)")
    c.execute("CREATE INDEX results_agent_seq ON results(agent_id, seq)")


@migrations()
def m015_counts_per_collector(db: Database) -> None:
    """Result counts kept per collector (`counter`): several collectors on PostgreSQL each add
    to rows of their own, so no two transactions wait on one row (they deadlocked on it when
    their batches met the same agents in another order). Readers sum over counters; SQLite's
    one collector writes counter ''."""
    _run(
        db,
        """
        CREATE TABLE result_counts_v15 (
            agent_id INTEGER NOT NULL REFERENCES agents(id),
            class TEXT NOT NULL,
            counter TEXT NOT NULL DEFAULT '',
            n INTEGER NOT NULL,
            PRIMARY KEY (agent_id, class, counter)
        ) WITHOUT ROWID;
        INSERT INTO result_counts_v15 (agent_id, class, n)
            SELECT agent_id, class, n FROM result_counts;
        DROP TABLE result_counts;
        ALTER TABLE result_counts_v15 RENAME TO result_counts
        """,
    )


@migrations()
def m016_refold_requests(db: Database) -> None:
    """Several collectors on PostgreSQL: a report for a known URL, taken by a collector that
    does not hold the URL's shard, asks the holder for a refold here. The holder claims the
    request (deletes it) in the transaction that refolds, so a request made while it refolds
    stays for its next tick (a flag in url_state could be cleared by that refold)."""
    _run(db, "CREATE TABLE refold_requests (id INTEGER PRIMARY KEY, url_id INTEGER NOT NULL)")
