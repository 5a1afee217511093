"""Bundles verify offline, and each kind of tampering is detected and named."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.keys import AgentKey
from collector.cli import main
from collector.evidence.bundle import build_bundle, read_bundle, write_bundle
from collector.evidence.checkpoint import Checkpoint, sign_checkpoint
from collector.evidence.errors import MalformedBundle
from collector.evidence.leaves import (
    AgentKeyLeaf,
    Attribution,
    BatchLeaf,
    Leaf,
    NoticeLeaf,
    Observation,
    ObservationLeaf,
    ReferenceForm,
    VerdictEvent,
    VerdictLeaf,
    batch_signing_bytes,
    encode_leaf,
    observation_signing_bytes,
    url_sha256,
)
from collector.evidence.log import MerkleLog
from collector.evidence.merkle import leaf_hash, root_of
from collector.evidence.note import NoteSigner
from collector.evidence.verify import Report, verify_bundle

URL = "http://hoster.example/reported/page.html"
OTHER_URL = "http://elsewhere.example/other"
CONTENT = b"<html>the reported content itself</html>"
T0 = 1_700_000_000_000_000
MINUTE = 60_000_000
LOG = NoteSigner.generate("monitor.example/log")


@dataclass
class Scenario:
    """A log with two agents, one URL watched to a confirmed removal, and unrelated leaves."""

    log: MerkleLog = field(default_factory=MerkleLog)
    leaves: dict[int, Leaf] = field(default_factory=dict)
    heads: dict[bytes, int] = field(default_factory=dict)
    keys: dict[str, AgentKey] = field(default_factory=dict)
    batches: dict[int, list[bytes]] = field(default_factory=dict)  # batch leaf: its tree

    def add(self, leaf: Leaf) -> int:
        index = self.log.append(leaf_hash(encode_leaf(leaf)))
        self.leaves[index] = leaf
        return index

    def prev(self, url: str) -> int:
        return self.heads.get(url_sha256(url), -1)

    def url_leaf(self, url: str, leaf: Leaf) -> int:
        index = self.add(leaf)
        self.heads[url_sha256(url)] = index
        return index

    def agent(self, name: str) -> None:
        self.keys[name] = AgentKey(Ed25519PrivateKey.generate())
        self.add(AgentKeyLeaf(name, f"net-{name}", self.keys[name].public_key, T0))

    def notice(self, url: str) -> int:
        reference, form = NoticeLeaf.hashing_reference("CASE-1")
        leaf = NoticeLeaf(
            url_sha256(url), T0, T0 + MINUTE, 0, 0, reference, form, b"", T0, self.prev(url)
        )
        return self.url_leaf(url, leaf)

    def batch(self, agent: str, items: list[tuple[str, int, int]]) -> list[int]:
        """One batch signed by `agent`, of observations (URL, minute, status): its leaf, then
        theirs; their indices."""
        found = []
        for url, minute, status in items:
            body = hashlib.sha256(CONTENT).digest() if status == 200 else b""
            found.append(Observation(
                agent, f"net-{agent}", url_sha256(url), minute, T0 + minute * MINUTE, 40,
                status, url_sha256(url), body, len(CONTENT) if body else 0, False, "192.0.2.7",
                "none", 0, False, "plaintext",
            ))  # fmt: skip
        hashes = [leaf_hash(observation_signing_bytes(o)) for o in found]
        root = root_of(hashes)
        network = f"net-{agent}"
        signature = self.keys[agent].sign(batch_signing_bytes(agent, network, len(found), root))
        received = found[-1].started_at_us + 5
        batch = self.add(BatchLeaf(agent, network, len(found), root, signature, received))
        self.batches[batch] = hashes
        where = Attribution("Hoster A", 64500, False)
        return [
            self.url_leaf(url, ObservationLeaf(obs, batch, k, where, received, self.prev(url)))
            for k, (obs, (url, _, _)) in enumerate(zip(found, items, strict=True))
        ]

    def observe(self, agent: str, url: str, minute: int, status: int) -> int:
        """A batch of one observation; its index."""
        return self.batch(agent, [(url, minute, status)])[0]

    def checkpoint(self, size: int | None = None) -> str:
        n = self.log.size if size is None else size
        return sign_checkpoint(Checkpoint(LOG.name, n, self.log.root(n)), LOG)


def scenario() -> tuple[Scenario, list[int], str]:
    """The scenario, the indices of the bundle's leaves, and an older checkpoint."""
    s = Scenario()
    s.agent("agent-a")
    s.agent("agent-b")
    s.notice(URL)
    present = [s.observe("agent-a", URL, 1, 200), s.observe("agent-b", URL, 2, 200)]
    s.notice(OTHER_URL)
    removed = [s.observe("agent-a", URL, 10, 404)]
    older = s.checkpoint()
    removed += [
        s.batch("agent-b", [(OTHER_URL, 11, 200), (URL, 11, 404)])[1],  # a batch of two URLs
        s.observe("agent-a", URL, 20, 410),
        s.observe("agent-b", URL, 21, 404),
    ]
    verdict = VerdictLeaf(
        url_sha256(URL), VerdictEvent.REMOVAL_CONFIRMED, "witness-quorum/3",
        T0 + 22 * MINUTE, 1, T0 + 2 * MINUTE, T0 + 10 * MINUTE, 0, 0,
        tuple(present + removed), s.prev(URL),
    )  # fmt: skip
    s.url_leaf(URL, verdict)
    s.observe("agent-a", OTHER_URL, 30, 200)
    about = {i for i, leaf in s.leaves.items() if _about(leaf) == url_sha256(URL)}
    batches = {leaf.batch for i, leaf in s.leaves.items() if i in about and
               isinstance(leaf, ObservationLeaf)}  # fmt: skip
    keys = {i for i, leaf in s.leaves.items() if isinstance(leaf, AgentKeyLeaf)}
    return s, sorted(about | batches | keys), older


def _about(leaf: Leaf) -> bytes | None:
    return None if isinstance(leaf, (AgentKeyLeaf, BatchLeaf)) else leaf.url_sha256


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    s, wanted, older = scenario()
    bundle = build_bundle(
        s.log, [(i, s.leaves[i]) for i in wanted], s.checkpoint(), LOG.verifier(),
        urls=[url_sha256(URL)], older=[older], batches=s.batches,
    )  # fmt: skip
    write_bundle(bundle, tmp_path / "bundle")
    return tmp_path / "bundle"


def entries(directory: Path) -> list[dict[str, Any]]:
    lines = (directory / "entries.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def save(directory: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (directory / "entries.jsonl").write_text(text)


def observations(rows: list[dict[str, Any]], agent: str | None = None) -> list[int]:
    return [
        i
        for i, r in enumerate(rows)
        if r["leaf"]["leaf"] == "observation"
        and (agent is None or r["leaf"]["observation"]["agent"] == agent)
    ]


def check(directory: Path) -> Report:
    return verify_bundle(read_bundle(directory), LOG.verifier())


class TestIntactBundle:
    def test_verifies(self, bundle_dir: Path) -> None:
        """A bundle as written verifies: every leaf included, signed and complete."""
        report = check(bundle_dir)
        assert report.problems == []
        assert (report.entries, report.observations, report.urls) == (16, 6, 1)
        assert report.agents == {"agent-a", "agent-b"}
        assert (report.checkpoint_size, report.older_checkpoints) == (20, 1)

    def test_holds_no_content_and_no_url(self, bundle_dir: Path) -> None:
        """No body byte, no URL text and no case reference appears in any file of a bundle."""
        for path in bundle_dir.iterdir():
            data = path.read_bytes()
            for marker in (CONTENT, b"the reported content", URL.encode(), b"hoster.example",
                           b"CASE-1"):  # fmt: skip
                assert marker not in data, (path.name, marker)
            # A batch it relies on also held an observation of another URL: nothing of that.
            assert url_sha256(OTHER_URL).hex().encode() not in data, path.name

    def test_writer_refuses_a_leaf_the_log_lacks(self) -> None:
        """The writer will not put a leaf in a bundle that differs from the logged one."""
        s, wanted, _ = scenario()
        forged = replace(s.leaves[wanted[-1]], url_prev=0)
        with pytest.raises(ValueError, match="another leaf"):
            build_bundle(s.log, [(wanted[-1], forged)], s.checkpoint(), LOG.verifier(), urls=[])

    def test_writer_refuses_a_non_empty_directory(self, bundle_dir: Path) -> None:
        """Writing over an existing bundle is refused rather than mixing two."""
        with pytest.raises(FileExistsError):
            write_bundle(read_bundle(bundle_dir), bundle_dir)

    def test_missing_file_is_named(self, bundle_dir: Path) -> None:
        """A bundle without its checkpoint cannot be read, and the error names the file."""
        (bundle_dir / "checkpoint.txt").unlink()
        with pytest.raises(MalformedBundle, match=r"checkpoint\.txt"):
            read_bundle(bundle_dir)


class TestTampering:
    """Each change a hoster or operator might make is detected, and named."""

    @pytest.mark.parametrize(("field_", "value"), [("status", 200), ("started_at_us", T0)])
    def test_changed_observation(self, bundle_dir: Path, field_: str, value: int) -> None:
        """A changed status or probe time breaks the agent's signature and the inclusion."""
        rows = entries(bundle_dir)
        target = observations(rows)[3]
        rows[target]["leaf"]["observation"][field_] = value
        save(bundle_dir, rows)
        report = check(bundle_dir)
        assert report.checks() == {"signature", "inclusion"}
        assert all(f"index {rows[target]['index']}" in p.where for p in report.problems)

    def test_dropped_observation(self, bundle_dir: Path) -> None:
        """Leaving out one observation breaks the URL's chain and the verdict's basis."""
        rows = entries(bundle_dir)
        dropped = rows.pop(observations(rows)[3])
        save(bundle_dir, rows)
        report = check(bundle_dir)
        assert report.checks() == {"chain", "basis"}
        assert any(f"observation {dropped['index']}" in p.message for p in report.problems)

    def test_dropped_first_leaf(self, bundle_dir: Path) -> None:
        """Leaving out the notice (the URL's first leaf) is detected too."""
        rows = [r for r in entries(bundle_dir) if r["leaf"]["leaf"] != "notice"]
        save(bundle_dir, rows)
        assert check(bundle_dir).checks() == {"chain"}

    def test_reordered_lines(self, bundle_dir: Path) -> None:
        """Two observations swapped in the file are out of log order."""
        rows = entries(bundle_dir)
        a, b = observations(rows)[1:3]
        rows[a], rows[b] = rows[b], rows[a]
        save(bundle_dir, rows)
        assert check(bundle_dir).checks() == {"order"}

    def test_reordered_in_the_log(self, bundle_dir: Path) -> None:
        """Two observations claiming each other's place in the log fail inclusion."""
        rows = entries(bundle_dir)
        a, b = observations(rows)[1:3]
        rows[a]["leaf"], rows[b]["leaf"] = rows[b]["leaf"], rows[a]["leaf"]
        save(bundle_dir, rows)
        report = check(bundle_dir)
        assert "inclusion" in report.checks()
        assert "signature" not in report.checks()

    def test_swapped_signatures(self, bundle_dir: Path) -> None:
        """Two batches' signatures exchanged: both fail, each named."""
        rows = entries(bundle_dir)
        a, b = [i for i, r in enumerate(rows) if r["leaf"]["leaf"] == "batch"
                and r["leaf"]["agent"] == "agent-a"][:2]  # fmt: skip
        sig_a = rows[a]["leaf"]["signature"]
        rows[a]["leaf"]["signature"] = rows[b]["leaf"]["signature"]
        rows[b]["leaf"]["signature"] = sig_a
        save(bundle_dir, rows)
        report = check(bundle_dir)
        failed = {p.where for p in report.problems if p.check == "signature"}
        assert failed == {
            f"index {rows[a]['index']} (batch of agent-a, 1 results)",
            f"index {rows[b]['index']} (batch of agent-a, 1 results)",
        }

    def test_observation_moved_to_another_batch(self, bundle_dir: Path) -> None:
        """An observation claiming a place in another signed batch of its agent is not in it."""
        rows = entries(bundle_dir)
        a, b = observations(rows, "agent-a")[:2]
        rows[b]["leaf"]["batch"] = rows[a]["leaf"]["batch"]
        save(bundle_dir, rows)
        report = check(bundle_dir)
        assert report.checks() == {"inclusion", "signature"}
        assert any("not what its agent signed" in p.message for p in report.problems)

    def test_altered_checkpoint(self, bundle_dir: Path) -> None:
        """A checkpoint whose size or root was edited no longer carries the log's signature."""
        path = bundle_dir / "checkpoint.txt"
        path.write_text(path.read_text().replace("\n20\n", "\n19\n", 1))
        report = check(bundle_dir)
        assert "checkpoint" in report.checks()
        assert "not signed by the log key" in str(report.problems[0])

    def test_another_agents_key(self, bundle_dir: Path) -> None:
        """agent-a's logged key replaced by agent-b's: the key leaf and a's batches fail."""
        rows = entries(bundle_dir)
        key_a, key_b = (r for r in rows if r["leaf"]["leaf"] == "agent_key")
        key_a["leaf"]["public_key"] = key_b["leaf"]["public_key"]
        save(bundle_dir, rows)
        report = check(bundle_dir)
        assert report.checks() == {"inclusion", "signature"}
        signature_failures = [p for p in report.problems if p.check == "signature"]
        assert len(signature_failures) == 3
        assert all("agent-a" in p.where for p in signature_failures)

    def test_observation_signed_by_another_agent(self, bundle_dir: Path) -> None:
        """A batch re-signed by someone else's key is refused even if the log had it."""
        s, wanted, _ = scenario()
        index = next(i for i in wanted if isinstance(s.leaves[i], BatchLeaf))
        leaf = s.leaves[index]
        assert isinstance(leaf, BatchLeaf)
        other = AgentKey(Ed25519PrivateKey.generate())
        forged = replace(leaf, signature=other.sign(leaf.signing_bytes()))
        forged_log = MerkleLog.of(
            leaf_hash(encode_leaf(forged if i == index else s.leaves[i])) for i in s.leaves
        )
        s.log, s.leaves[index] = forged_log, forged
        bundle = build_bundle(
            s.log, [(i, s.leaves[i]) for i in wanted], s.checkpoint(), LOG.verifier(),
            urls=[url_sha256(URL)], batches=s.batches,
        )  # fmt: skip
        report = verify_bundle(bundle, LOG.verifier())
        assert report.checks() == {"signature"}

    def test_observation_with_another_batch_tree(self) -> None:
        """A bundle that gives an observation a proof into a tree its agent never signed (the
        collector's own) fails at the batch's signature, not silently."""
        s, wanted, _ = scenario()
        index = next(i for i in wanted if isinstance(s.leaves[i], BatchLeaf))
        leaf = s.leaves[index]
        assert isinstance(leaf, BatchLeaf)
        made_up = [*s.batches[index], leaf_hash(b"an observation the agent never made")]
        forged = replace(leaf, size=len(made_up), root=root_of(made_up))
        s.log = MerkleLog.of(
            leaf_hash(encode_leaf(forged if i == index else s.leaves[i])) for i in s.leaves
        )
        s.leaves[index], s.batches[index] = forged, made_up
        bundle = build_bundle(
            s.log, [(i, s.leaves[i]) for i in wanted], s.checkpoint(), LOG.verifier(),
            urls=[url_sha256(URL)], batches=s.batches,
        )  # fmt: skip
        report = verify_bundle(bundle, LOG.verifier())
        assert report.checks() == {"signature"}
        assert [p.where for p in report.problems] == [
            f"index {index} (batch of agent-a, 2 results)"
        ]

    def test_inconsistent_older_checkpoint(self, bundle_dir: Path) -> None:
        """An earlier checkpoint of a history the log later rewrote fails consistency."""
        s, _, _ = scenario()
        fork = MerkleLog.of(s.log.leaf(i) for i in range(6))
        fork.append(leaf_hash(b"a leaf that was later taken out"))
        old = sign_checkpoint(Checkpoint(LOG.name, 7, fork.root()), LOG)
        older_file = (bundle_dir / "older-checkpoints.jsonl").read_text()
        rows = [json.loads(line) for line in older_file.splitlines()]
        rows[0]["checkpoint"] = old
        (bundle_dir / "older-checkpoints.jsonl").write_text(json.dumps(rows[0]) + "\n")
        report = check(bundle_dir)
        assert report.checks() == {"consistency"}
        assert "size 7" in report.problems[0].where

    def test_another_log_key(self, bundle_dir: Path) -> None:
        """Verified against the published key, a bundle re-signed by another log key fails."""
        other = NoteSigner.generate(LOG.name)
        (bundle_dir / "log.vkey").write_text(f"{other.verifier()}\n")
        assert check(bundle_dir).checks() == {"log-key"}
        report = verify_bundle(read_bundle(bundle_dir), other.verifier())
        assert "checkpoint" in report.checks()

    def test_unsigned_observation(self, bundle_dir: Path) -> None:
        """An observation in a batch without the agent's signature is named as unsigned."""
        rows = entries(bundle_dir)
        first = rows[observations(rows)[0]]["leaf"]["batch"]
        next(r for r in rows if r["index"] == first)["leaf"]["signature"] = ""
        save(bundle_dir, rows)
        report = check(bundle_dir)
        assert "signature" in report.checks()
        assert any("unsigned" in p.message for p in report.problems)

    def test_leaf_outside_scope(self, bundle_dir: Path) -> None:
        """A leaf about a URL the bundle does not declare is named."""
        manifest = json.loads((bundle_dir / "bundle.json").read_text())
        manifest["urls"] = []
        (bundle_dir / "bundle.json").write_text(json.dumps(manifest))
        assert check(bundle_dir).checks() == {"scope"}

    def test_malformed_leaf(self, bundle_dir: Path) -> None:
        """A leaf missing a field is named with its line, and the rest still checked."""
        rows = entries(bundle_dir)
        del rows[2]["leaf"]["notified_at_us"]
        save(bundle_dir, rows)
        report = check(bundle_dir)
        assert "leaf" in report.checks()
        assert any("line 3" in p.where for p in report.problems)


class TestCommand:
    def test_verify_ok(self, bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`evidence verify` says OK and exits 0 for an intact bundle, pinned to the log key."""
        code = main(["evidence", "verify", str(bundle_dir), "--log-key", str(LOG.verifier())])
        out = capsys.readouterr().out
        assert code == 0
        assert out.startswith("OK: 16 leaves (6 signed observations by 2 agents, 1 URLs)")
        assert "compare it with the published one" not in out

    def test_verify_fails_naming_the_problem(
        self, bundle_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A tampered bundle exits 1 with a line per problem; unpinned, it shows the key."""
        rows = entries(bundle_dir)
        rows[observations(rows)[0]]["leaf"]["observation"]["status"] = 500
        save(bundle_dir, rows)
        code = main(["evidence", "verify", str(bundle_dir)])
        out = capsys.readouterr().out
        assert code == 1
        assert "FAILED: 2 problems" in out
        assert "[signature] index 4 (observation by agent-a seq 1)" in out
        assert f"compare it with the published one): {LOG.verifier()}" in out

    def test_unreadable_bundle(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A directory that is no bundle is an error naming what is missing."""
        assert main(["evidence", "verify", str(tmp_path)]) == 1
        assert "has no bundle.json" in capsys.readouterr().err

    def test_log_key_init(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`log-key init` makes a 0600 signer and prints the verifier; never overwrites."""
        assert main(["log-key", "init", str(tmp_path / "k"), "--origin", "m.example/log"]) == 0
        vkey = capsys.readouterr().out.strip()
        assert vkey.startswith("m.example/log+")
        assert (tmp_path / "k" / "log.key").stat().st_mode & 0o077 == 0
        assert (tmp_path / "k" / "log.vkey").read_text().strip() == vkey
        assert main(["log-key", "init", str(tmp_path / "k"), "--origin", "m.example/log"]) == 1
        assert "exists" in capsys.readouterr().err


def test_reference_forms_are_known() -> None:
    """The notice in the scenario hashes its case reference (sensitive ids stay out)."""
    s, _, _ = scenario()
    notices = [leaf for leaf in s.leaves.values() if isinstance(leaf, NoticeLeaf)]
    assert {n.reference_form for n in notices} == {ReferenceForm.SHA256}


def _scalars(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _scalars(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _scalars(v, (*path, i))]
    return [path]


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if value == "":
        return "0" * 64
    return value[:-1] + ("A" if value[-1] != "A" else "B")


class TestAnyChange:
    BUNDLE = None

    @classmethod
    def bundle(cls) -> Any:
        if cls.BUNDLE is None:
            s, wanted, older = scenario()
            cls.BUNDLE = build_bundle(
                s.log, [(i, s.leaves[i]) for i in wanted], s.checkpoint(), LOG.verifier(),
                urls=[url_sha256(URL)], older=[older], batches=s.batches,
            )  # fmt: skip
        return cls.BUNDLE

    @settings(max_examples=150, deadline=None)
    @given(st.data())
    def test_any_one_value_changed_is_detected(self, data: st.DataObject) -> None:
        """Changing any one value of any entry (leaf, index or proof) makes verification fail."""
        bundle = self.bundle()
        rows = copy.deepcopy(bundle.entries)
        line = data.draw(st.integers(0, len(rows) - 1))
        path = data.draw(st.sampled_from(_scalars(rows[line])))
        target = rows[line]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = _changed(target[path[-1]])
        report = verify_bundle(replace(bundle, entries=rows), LOG.verifier())
        assert not report.ok, (line, path)
