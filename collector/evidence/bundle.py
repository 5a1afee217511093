"""An evidence bundle: the leaves about some URLs, proven against one signed checkpoint.

A bundle is a directory of plain files (docs/EVIDENCE.md specifies them):

    bundle.json               what the bundle is about: format, log origin, URL hashes
    log.vkey                  the log's verifier key (compare it with the published one)
    checkpoint.txt            the log's signed checkpoint every proof leads to
    entries.jsonl             one leaf a line, in log order, with its inclusion proof
                              (and, for an observation, its proof inside its batch)
    older-checkpoints.jsonl   earlier signed checkpoints with consistency proofs to it

`build_bundle` is pure: it takes the leaves (with their log indices), the log
they are in and a signed checkpoint, and computes every proof. `write_bundle`
and `read_bundle` are the only functions here that touch files.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collector.evidence.checkpoint import Checkpoint
from collector.evidence.errors import MalformedBundle
from collector.evidence.leaves import Leaf, ObservationLeaf, encode_leaf, observation_signing_bytes
from collector.evidence.log import MerkleLog
from collector.evidence.merkle import inclusion_path, leaf_hash
from collector.evidence.note import NoteVerifier, parse_note

FORMAT = "takedown-monitor/evidence-bundle/v2"
MANIFEST = "bundle.json"
LOG_KEY = "log.vkey"
CHECKPOINT = "checkpoint.txt"
ENTRIES = "entries.jsonl"
OLDER = "older-checkpoints.jsonl"
FILES = (MANIFEST, LOG_KEY, CHECKPOINT, ENTRIES, OLDER)


@dataclass(frozen=True)
class Bundle:
    """A bundle's contents as parsed JSON and text, not yet checked."""

    manifest: Any
    log_key: str
    checkpoint: str
    entries: list[Any]
    older: list[Any]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def checkpoint_size(note: str) -> int:
    """The tree size a signed checkpoint claims (its signature is not checked here)."""
    text, _ = parse_note(note)
    return Checkpoint.parse(text).size


def build_bundle(
    log: MerkleLog,
    entries: Iterable[tuple[int, Leaf]],
    checkpoint: str,
    log_key: NoteVerifier,
    *,
    urls: Sequence[bytes],
    older: Sequence[str] = (),
    batches: Mapping[int, Sequence[bytes]] | None = None,
) -> Bundle:
    """The bundle of `entries` (log index, leaf) with proofs against `checkpoint`.

    Each leaf must be the one the log holds at its index and below the
    checkpoint's size; `older` are earlier signed checkpoints of the same log.
    `batches` holds, for the batch leaf of each observation among the entries, its
    tree's leaf hashes (an observation's proof inside its batch is made from them).
    """
    batches = batches or {}
    size = checkpoint_size(checkpoint)
    rows: list[Any] = []
    for index, leaf in sorted(entries, key=lambda e: e[0]):
        if index >= size:
            raise ValueError(f"leaf {index} is not under the checkpoint of size {size}")
        if log.leaf(index) != leaf_hash(encode_leaf(leaf)):
            raise ValueError(f"the log holds another leaf at index {index}")
        proof = [_b64(p) for p in log.inclusion_proof(index, size)]
        row = {"index": index, "leaf": leaf.to_json(), "inclusion_proof": proof}
        if isinstance(leaf, ObservationLeaf):
            row["batch_proof"] = _batch_proof(leaf, batches.get(leaf.batch))
        rows.append(row)
    older_rows: list[Any] = []
    for note in older:
        old_size = checkpoint_size(note)
        proof = [_b64(p) for p in log.consistency_proof(old_size, size)]
        older_rows.append({"checkpoint": note, "consistency_proof": proof})
    manifest = {
        "format": FORMAT,
        "log": log_key.name,
        "urls": sorted(u.hex() for u in urls),
    }
    return Bundle(manifest, str(log_key) + "\n", checkpoint, rows, older_rows)


def _batch_proof(leaf: ObservationLeaf, hashes: Sequence[bytes] | None) -> list[str]:
    """The observation's inclusion proof in its batch's tree."""
    o = leaf.observation
    if hashes is None:
        raise ValueError(f"no tree given for batch {leaf.batch} (seq {o.seq} of {o.agent})")
    index = leaf.batch_index
    if index >= len(hashes) or hashes[index] != leaf_hash(observation_signing_bytes(o)):
        raise ValueError(f"batch {leaf.batch} holds another observation at {index}")
    return [_b64(p) for p in inclusion_path(index, hashes)]


def _jsonl(rows: Iterable[Any]) -> str:
    return "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)


def write_bundle(bundle: Bundle, directory: Path) -> None:
    """Write the bundle's files into `directory`, which must not exist or be empty."""
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; not writing a bundle into it")
    contents = {
        MANIFEST: json.dumps(bundle.manifest, indent=2, sort_keys=True) + "\n",
        LOG_KEY: bundle.log_key,
        CHECKPOINT: bundle.checkpoint,
        ENTRIES: _jsonl(bundle.entries),
        OLDER: _jsonl(bundle.older),
    }
    for name, text in contents.items():
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)


def _read(directory: Path, name: str) -> str:
    try:
        return (directory / name).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise MalformedBundle(f"the bundle has no {name}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise MalformedBundle(f"cannot read {name}: {exc}") from exc


def _parse_lines(name: str, text: str) -> list[Any]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise MalformedBundle(f"{name} line {number} is not JSON: {exc.msg}") from exc
    return rows


def read_bundle(directory: Path) -> Bundle:
    """The bundle in `directory`, parsed but not checked; MalformedBundle if it cannot be."""
    if not directory.is_dir():
        raise MalformedBundle(f"{directory} is not a directory")
    try:
        manifest = json.loads(_read(directory, MANIFEST))
    except json.JSONDecodeError as exc:
        raise MalformedBundle(f"{MANIFEST} is not JSON: {exc.msg}") from exc
    return Bundle(
        manifest=manifest,
        log_key=_read(directory, LOG_KEY),
        checkpoint=_read(directory, CHECKPOINT),
        entries=_parse_lines(ENTRIES, _read(directory, ENTRIES)),
        older=_parse_lines(OLDER, _read(directory, OLDER)),
    )
