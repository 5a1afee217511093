"""The collector's state in one SQLite file: the only package that runs SQL."""

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
