"""Check a bundle offline, with nothing but its files and (ideally) the log's published key.

Theory of operation. Trust flows from one key. The log's key must have signed
the checkpoint; every entry must be included under that checkpoint's root at
the index it claims; so every leaf is exactly what the log committed to. An
agent's key counts only if an `agent_key` leaf committed it before the
batch; every observation must be proven inside the tree of a `batch` leaf of
its agent (its `batch_proof`), and that batch must carry a valid signature by
the key over the tree's root, so the collector could not have made or changed
an observation. Completeness comes from the
per-URL chain: each leaf about a URL names the index of the previous one
(`url_prev`), so the bundle must hold every leaf about its URLs from the first
up to its last, in order; and a verdict's basis must all be there. Earlier
checkpoints, if the bundle carries any, must be consistent with its own: the
log never rewrote what it had signed.

Every check that fails adds a `Problem` naming the check, the place and what
is wrong; checks go on after a failure so that one run reports all of them.
"""

from __future__ import annotations

import base64
import binascii
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from collector.evidence.bundle import FORMAT, Bundle
from collector.evidence.checkpoint import Checkpoint, open_checkpoint
from collector.evidence.errors import EvidenceError
from collector.evidence.leaves import (
    AgentKeyLeaf,
    BatchLeaf,
    Leaf,
    ObservationLeaf,
    UrlLeaf,
    VerdictLeaf,
    encode_leaf,
    leaf_from_json,
    observation_signing_bytes,
)
from collector.evidence.merkle import leaf_hash, verify_consistency, verify_inclusion
from collector.evidence.note import NoteVerifier, ed25519_verifies


@dataclass(frozen=True)
class Problem:
    """One failed check: which (a stable word), where, and what is wrong."""

    check: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.where}: {self.message}"


@dataclass
class Report:
    """What a verification found: the problems, and what was checked."""

    problems: list[Problem] = field(default_factory=list)
    log_key: str = ""
    checkpoint_size: int = -1
    entries: int = 0
    observations: int = 0
    agents: set[str] = field(default_factory=set)
    urls: int = 0
    older_checkpoints: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, check: str, where: str, message: str) -> None:
        self.problems.append(Problem(check, where, message))

    def checks(self) -> set[str]:
        return {p.check for p in self.problems}


def _hashes(values: Any, what: str) -> list[bytes]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise EvidenceError(f"{what} is not a list of base64 hashes")
    try:
        return [base64.b64decode(v, validate=True) for v in values]
    except (binascii.Error, ValueError) as exc:
        raise EvidenceError(f"{what} is not a list of base64 hashes") from exc


def _describe(index: int, leaf: Leaf) -> str:
    if isinstance(leaf, ObservationLeaf):
        o = leaf.observation
        return f"index {index} (observation by {o.agent} seq {o.seq})"
    if isinstance(leaf, AgentKeyLeaf):
        return f"index {index} (key of {leaf.agent})"
    if isinstance(leaf, BatchLeaf):
        return f"index {index} (batch of {leaf.agent}, {leaf.size} results)"
    kind = "notice" if not isinstance(leaf, VerdictLeaf) else f"verdict {leaf.event.value}"
    return f"index {index} ({kind})"


def _log_key(bundle: Bundle, pinned: NoteVerifier | None, report: Report) -> NoteVerifier | None:
    try:
        given = NoteVerifier.parse(bundle.log_key)
    except EvidenceError as exc:
        report.fail("log-key", "log.vkey", str(exc))
        given = None
    if pinned is not None:
        if given is not None and given != pinned:
            report.fail("log-key", "log.vkey", f"is {given}, not the log key given ({pinned})")
        report.log_key = str(pinned)
        return pinned
    if given is not None:
        report.log_key = str(given)
    return given


def _checkpoint(bundle: Bundle, key: NoteVerifier | None, report: Report) -> Checkpoint | None:
    if key is None:
        report.fail("checkpoint", "checkpoint.txt", "no usable log key to check it with")
        return None
    try:
        checkpoint = open_checkpoint(bundle.checkpoint, key)
    except EvidenceError as exc:
        report.fail("checkpoint", "checkpoint.txt", f"not signed by the log key: {exc}")
        return None
    report.checkpoint_size = checkpoint.size
    return checkpoint


def _entries(
    bundle: Bundle, checkpoint: Checkpoint | None, report: Report, batch_proofs: dict[int, Any]
) -> list[tuple[int, Leaf]]:
    """The entries whose leaves parse, checking log order and inclusion on the way; each
    observation's proof inside its batch goes into `batch_proofs` (by log index)."""
    leaves: list[tuple[int, Leaf]] = []
    last = -1
    for line, row in enumerate(bundle.entries, 1):
        where = f"entries.jsonl line {line}"
        if not isinstance(row, dict) or type(row.get("index")) is not int or row["index"] < 0:
            report.fail("entry", where, "not an object with a leaf index")
            continue
        index = row["index"]
        try:
            leaf = leaf_from_json(row.get("leaf"))
        except EvidenceError as exc:
            report.fail("leaf", f"{where} (index {index})", str(exc))
            continue
        if index <= last:
            report.fail("order", f"{where} (index {index})", f"comes after index {last}")
        last = max(last, index)
        if checkpoint is not None:
            try:
                proof = _hashes(row.get("inclusion_proof"), "inclusion_proof")
                verify_inclusion(
                    index, checkpoint.size, leaf_hash(encode_leaf(leaf)), proof, checkpoint.root
                )
            except EvidenceError as exc:
                report.fail(
                    "inclusion",
                    f"{where}, {_describe(index, leaf)}",
                    f"not in the log at this index under the checkpoint: {exc}",
                )
        if isinstance(leaf, ObservationLeaf):
            batch_proofs[index] = row.get("batch_proof")
        leaves.append((index, leaf))
    report.entries = len(leaves)
    return leaves


def _batches(
    leaves: Sequence[tuple[int, Leaf]], report: Report
) -> dict[int, tuple[BatchLeaf, str | None]]:
    """Each batch leaf, with what is wrong with its signature (None: it verifies)."""
    keys: dict[str, list[tuple[int, AgentKeyLeaf]]] = defaultdict(list)
    batches: dict[int, tuple[BatchLeaf, str | None]] = {}
    for index, leaf in leaves:
        if isinstance(leaf, AgentKeyLeaf):
            keys[leaf.agent].append((index, leaf))
        elif isinstance(leaf, BatchLeaf):
            earlier = [k for i, k in keys.get(leaf.agent, []) if i < index]
            problem = None
            if not earlier:
                problem = f"no key of agent {leaf.agent!r} was logged before its batch"
                report.fail("agent-key", _describe(index, leaf), problem)
            elif not leaf.signature:
                problem = "unsigned: the agent's word is missing"
            elif not ed25519_verifies(earlier[-1].public_key, leaf.signing_bytes(), leaf.signature):
                problem = (
                    f"the batch's signature is not by the key logged for {leaf.agent!r}: the"
                    " batch was changed after the agent signed it, or someone else signed it"
                )
                report.fail("signature", _describe(index, leaf), problem)
            batches[index] = (leaf, problem)
    return batches


def _signatures(
    leaves: Sequence[tuple[int, Leaf]], batch_proofs: dict[int, Any], report: Report
) -> None:
    batches = _batches(leaves, report)
    for index, leaf in leaves:
        if not isinstance(leaf, ObservationLeaf):
            continue
        report.observations += 1
        obs = leaf.observation
        report.agents.add(obs.agent)
        where = _describe(index, leaf)
        found = batches.get(leaf.batch)
        if found is None or leaf.batch >= index:
            report.fail("batch", where, f"its batch leaf {leaf.batch} is not an earlier entry here")
            continue
        batch, problem = found
        if (batch.agent, batch.network) != (obs.agent, obs.network):
            report.fail(
                "batch", where, f"its batch {leaf.batch} is of {batch.agent!r}, not {obs.agent!r}"
            )
            continue
        try:
            proof = _hashes(batch_proofs.get(index), "batch_proof")
            verify_inclusion(
                leaf.batch_index, batch.size, leaf_hash(observation_signing_bytes(obs)), proof,
                batch.root,
            )  # fmt: skip
        except EvidenceError as exc:
            report.fail(
                "signature",
                where,
                f"not what its agent signed in batch {leaf.batch} (the observation was changed"
                f" after the agent signed it, or is not in that batch): {exc}",
            )
            continue
        if problem is not None and problem.startswith("unsigned"):
            report.fail("signature", where, problem)


def _chains(leaves: Sequence[tuple[int, Leaf]], manifest: Any, report: Report) -> None:
    declared: set[str] = set()
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        report.fail("manifest", "bundle.json", f"format is not {FORMAT!r}")
    else:
        urls = manifest.get("urls")
        if isinstance(urls, list):
            declared = {u for u in urls if isinstance(u, str)}
    report.urls = len(declared)
    by_url: dict[str, list[tuple[int, UrlLeaf]]] = defaultdict(list)
    for index, leaf in leaves:
        if not isinstance(leaf, (AgentKeyLeaf, BatchLeaf)):
            by_url[leaf_url(leaf).hex()].append((index, leaf))
    for url in sorted(by_url.keys() - declared):
        report.fail("scope", f"URL {url[:16]}…", "has leaves here but bundle.json does not list it")
    for url in sorted(declared):
        chain = sorted(by_url.get(url, []), key=lambda e: e[0])
        if not chain:
            report.fail("chain", f"URL {url[:16]}…", "listed, but the bundle has no leaf about it")
            continue
        previous = -1
        for index, leaf in chain:
            if leaf.url_prev != previous:
                if leaf.url_prev < previous:
                    what = "an earlier leaf than the one before it here (the order was changed)"
                elif previous == -1:
                    what = "a leaf the bundle lacks: the URL's first leaves were left out"
                else:
                    what = f"a leaf the bundle lacks, not index {previous}: a leaf was left out"
                report.fail(
                    "chain",
                    _describe(index, leaf),
                    f"says the previous leaf about its URL is {leaf.url_prev}, {what}",
                )
            previous = index
    present = {index: leaf for index, leaf in leaves if isinstance(leaf, ObservationLeaf)}
    for index, leaf in leaves:
        if not isinstance(leaf, VerdictLeaf):
            continue
        for b in leaf.basis:
            obs = present.get(b)
            if obs is None or b >= index or obs.url_sha256 != leaf.url_sha256:
                report.fail(
                    "basis",
                    _describe(index, leaf),
                    f"rests on observation {b}, which is not an earlier one about this URL here",
                )


def leaf_url(leaf: UrlLeaf) -> bytes:
    return leaf.url_sha256


def _older(
    bundle: Bundle, key: NoteVerifier | None, checkpoint: Checkpoint | None, report: Report
) -> None:
    for line, row in enumerate(bundle.older, 1):
        where = f"older-checkpoints.jsonl line {line}"
        report.older_checkpoints += 1
        if key is None or checkpoint is None:
            report.fail("consistency", where, "cannot be checked without the bundle's checkpoint")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("checkpoint"), str):
            report.fail("consistency", where, "not an object with a signed checkpoint")
            continue
        try:
            old = open_checkpoint(row["checkpoint"], key)
        except EvidenceError as exc:
            report.fail("older-checkpoint", where, f"not signed by the log key: {exc}")
            continue
        try:
            proof = _hashes(row.get("consistency_proof"), "consistency_proof")
            verify_consistency(old.size, checkpoint.size, old.root, checkpoint.root, proof)
        except EvidenceError as exc:
            report.fail(
                "consistency",
                f"{where} (size {old.size})",
                f"the log's earlier checkpoint is not a prefix of this one: {exc}",
            )


def verify_bundle(bundle: Bundle, log_key: NoteVerifier | None = None) -> Report:
    """Check every claim the bundle makes; `log_key` pins the log's key (recommended)."""
    report = Report()
    key = _log_key(bundle, log_key, report)
    checkpoint = _checkpoint(bundle, key, report)
    batch_proofs: dict[int, Any] = {}
    leaves = _entries(bundle, checkpoint, report, batch_proofs)
    _signatures(leaves, batch_proofs, report)
    _chains(leaves, bundle.manifest, report)
    _older(bundle, key, checkpoint, report)
    return report
