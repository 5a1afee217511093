"""URL shards and their leases, for several collectors on one PostgreSQL database.

URLs are split into `SHARDS` shards by id (`url_id % SHARDS`). Any collector stores any
result it receives; only the collector holding a shard's lease folds that shard's URLs.
Results of shards it does not hold go into `fold_queue`, which their holder folds from.

A lease is a row of `shard_leases`: owner, epoch, expiry. Times are the database server's
clock, so collectors' clocks do not matter. Each collector renews its leases every tick,
takes free or expired shards up to its fair share (shards / live collectors) and gives
back those above it, so a new collector gets its share and a dead one's shards move
within the lease time.

Fencing: every transaction that folds locks the lease rows of the shards it holds
(`FOR SHARE`) and checks that owner and epoch are still its own (`fence`). A takeover
must update those rows, so it waits for that transaction to end, and a collector that lost
a shard finds out before it writes a fold of it: it cannot write.

SQLite has one collector per file: no leases, every shard held.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from collector.store.sql import Connection

SHARDS = 64
LEASE_SECONDS = 15.0  # a dead collector's shards move within this (plus one tick)
TICK_SECONDS = 1.0  # how often a collector renews, rebalances and folds its queue
FORGET_AFTER = 86_400.0  # seconds without renewal after which a collector's row goes

log = logging.getLogger(__name__)

# The database server's clock, in Unix seconds.
_NOW = "EXTRACT(EPOCH FROM clock_timestamp())"


def shard_of(url_id: int) -> int:
    return url_id % SHARDS


def collector_name() -> str:
    """A name no other collector process has: host, pid and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Moved:
    """What a tick changed: shards taken and shards lost or given back."""

    gained: frozenset[int]
    lost: frozenset[int]


class Leases:
    """This collector's shard leases, on the writer's connection (PostgreSQL)."""

    def __init__(self, conn: Connection, name: str, seconds: float = LEASE_SECONDS) -> None:
        self.conn = conn
        self.name = name
        self.seconds = seconds
        self.owned: dict[int, int] = {}  # shard: the epoch we hold it at
        # What other threads (the metrics) read: replaced whole, never mutated.
        self.view: frozenset[int] = frozenset()

    def _publish(self) -> None:
        self.view = frozenset(self.owned)

    def others_live(self) -> int:
        """Other collectors that renewed within the lease time."""
        row = self.conn.execute(
            f"SELECT COUNT(*) FROM collectors WHERE name <> ? AND seen_at > {_NOW} - ?",
            (self.name, self.seconds),
        ).fetchone()
        return int(row[0])

    def tick(self) -> Moved:
        """Renew, then take or give back shards towards a fair share; its own transaction
        (the caller must have none open)."""
        c = self.conn
        c.execute("BEGIN")
        try:
            c.execute(
                f"INSERT INTO collectors (name, seen_at) VALUES (?, {_NOW})"
                " ON CONFLICT (name) DO UPDATE SET seen_at = excluded.seen_at",
                (self.name,),
            )
            # Collectors gone for a day (killed, never stopped cleanly) are forgotten.
            c.execute(f"DELETE FROM collectors WHERE seen_at < {_NOW} - ?", (FORGET_AFTER,))
            live = 1 + self.others_live()
            held = {
                int(s): int(e)
                for s, e in c.execute(
                    f"UPDATE shard_leases SET expires_at = {_NOW} + ? WHERE owner = ?"
                    " RETURNING shard, epoch",
                    (self.seconds, self.name),
                )
            }
            lost = {s for s, e in self.owned.items() if held.get(s) != e}
            kept = {s: e for s, e in held.items() if self.owned.get(s) == e}
            # A lease row of ours we did not know about (a restart under the same name does
            # not happen: names are unique), or one we lost: give it back.
            strays = sorted(set(held) - set(kept))
            fair = -(-SHARDS // live)  # ceil
            excess = sorted(kept)[fair:] if len(kept) > fair else []
            for s in excess:
                del kept[s]
            back = strays + excess
            if back:
                c.execute(
                    "UPDATE shard_leases SET owner = NULL, expires_at = 0"
                    " WHERE owner = ? AND shard = ANY(?)",
                    (self.name, back),
                )
            gained: dict[int, int] = {}
            if len(kept) < fair:
                gained = {
                    int(s): int(e)
                    for s, e in c.execute(
                        f"UPDATE shard_leases SET owner = ?, epoch = epoch + 1,"
                        f" expires_at = {_NOW} + ? WHERE shard IN (SELECT shard FROM"
                        f" shard_leases WHERE owner IS NULL OR expires_at < {_NOW}"
                        " ORDER BY shard LIMIT ? FOR UPDATE SKIP LOCKED) RETURNING shard, epoch",
                        (self.name, self.seconds, fair - len(kept)),
                    )
                }
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        self.owned = {**kept, **gained}
        self._publish()
        moved = Moved(frozenset(gained), frozenset(lost | set(excess) | set(strays)))
        if moved.gained or moved.lost:
            log.info(
                "shards_moved collector=%s gained=%d lost=%d holding=%d of %d (collectors: %d)",
                self.name, len(moved.gained), len(moved.lost), len(self.owned), SHARDS, live,
            )  # fmt: skip
        return moved

    def fence(self) -> frozenset[int]:
        """In the caller's transaction: lock our lease rows until it ends, and drop the shards
        that are no longer ours at our epoch (taken over); return those."""
        if not self.owned:
            return frozenset()
        rows = self.conn.execute(
            "SELECT shard, epoch FROM shard_leases WHERE owner = ? AND shard = ANY(?) FOR SHARE",
            (self.name, sorted(self.owned)),
        ).fetchall()
        held = {int(s): int(e) for s, e in rows}
        lost = frozenset(s for s, e in self.owned.items() if held.get(s) != e)
        if lost:
            for s in lost:
                del self.owned[s]
            self._publish()
            log.warning("shards_lost collector=%s shards=%d (taken over)", self.name, len(lost))
        return lost

    def release(self) -> None:
        """Give every lease back and leave (a clean stop): others take over at once."""
        c = self.conn
        c.execute("UPDATE shard_leases SET owner = NULL, expires_at = 0 WHERE owner = ?",
                  (self.name,))  # fmt: skip
        c.execute("DELETE FROM collectors WHERE name = ?", (self.name,))
        self.owned = {}
        self._publish()

    def owns(self, url_id: int) -> bool:
        return url_id % SHARDS in self.owned

    def urls_of(self, url_ids: Iterable[int], shards: Iterable[int]) -> list[int]:
        wanted = set(shards)
        return [u for u in url_ids if u % SHARDS in wanted]
