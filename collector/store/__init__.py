"""The collector's state (a SQLite file or a PostgreSQL database): the only package running SQL."""

from collector.store.model import (
    CorruptDatabase,
    Ingested,
    ResultIn,
    StorageFull,
    StoreError,
    SubmitOutcome,
    Submitted,
    Target,
)
from collector.store.writer import Writer
from collector.store.writes import Store

__all__ = [
    "CorruptDatabase",
    "Ingested",
    "ResultIn",
    "StorageFull",
    "Store",
    "StoreError",
    "SubmitOutcome",
    "Submitted",
    "Target",
    "Writer",
]
