"""Canonical content-free leaves, the bytes agents sign, and the agent's key file."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

from agent.keys import AgentKey, AgentKeyError, ResultSigner
from agent.link import encode
from agent.outbox import Batch
from agent.result import ErrorClass, ProbeResult
from collector.evidence.errors import MalformedLeaf
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
    canonical,
    decode_leaf,
    encode_leaf,
    encode_observation_leaf,
    observation_signing_bytes,
    url_sha256,
)
from collector.evidence.merkle import leaf_hash, root_of
from collector.evidence.wire import batch_tree, observation_of
from protos.takedown.v1 import takedown_pb2 as pb

URL = "http://hoster.example/some/reported/path?id=42"
BODY = hashlib.sha256(b"the reported content").digest()

OBSERVATION = Observation(
    agent="agent-a", network="nl-ams-isp1", url_sha256=url_sha256(URL), seq=17,
    started_at_us=1_700_000_000_123_456, elapsed_ms=85, status=200,
    final_url_sha256=url_sha256(URL), body_sha256=BODY, body_bytes=5120, truncated=False,
    peer_ip="192.0.2.7", error="none", redirects=0, challenge=False, tls="verified",
)  # fmt: skip


class TestSigningBytes:
    def test_known_answer(self) -> None:
        """The signed bytes are JCS: sorted keys, no spaces, hex hashes (this freezes v1)."""
        data = observation_signing_bytes(OBSERVATION)
        assert data == (
            b'{"agent":"agent-a","body_bytes":5120,"body_sha256":"' + BODY.hex().encode()
            + b'","challenge":false,"elapsed_ms":85,"error":"none","final_url_sha256":"'
            + url_sha256(URL).hex().encode() + b'","network":"nl-ams-isp1",'
            b'"peer_ip":"192.0.2.7","redirects":0,"seq":17,"started_at_us":1700000000123456,'
            b'"status":200,"tls":"verified","truncated":false,'
            b'"type":"takedown-monitor/observation/v1","url_sha256":"'
            + url_sha256(URL).hex().encode() + b'"}'
        )  # fmt: skip

    def test_same_from_the_wire_on_both_sides(self) -> None:
        """The agent's and the collector's Observation of one wire result are equal."""
        result = pb.ProbeResult(
            url_id=3, seq=17, started_at_unix_us=1_700_000_000_123_456, elapsed_ms=85,
            status=200, final_url=URL, body_sha256=BODY, body_bytes=5120, peer_ip="192.0.2.7",
            error=pb.ERROR_CLASS_NONE, tls=pb.TLS_CHECK_VERIFIED,
        )  # fmt: skip
        received = pb.ProbeResult.FromString(result.SerializeToString())
        assert observation_of("agent-a", "nl-ams-isp1", url_sha256(URL), result) == OBSERVATION
        assert observation_of("agent-a", "nl-ams-isp1", url_sha256(URL), received) == OBSERVATION

    def test_enum_names(self) -> None:
        """Error and TLS classes are the wire names without prefix; unknown numbers kept."""
        obs = observation_of(
            "a", "n", bytes(32), pb.ProbeResult(error=pb.ERROR_CLASS_DNS_NXDOMAIN, tls=99)
        )
        assert (obs.error, obs.tls, obs.final_url_sha256) == ("dns_nxdomain", "tls_check_99", b"")

    def test_batch_known_answer(self) -> None:
        """What an agent signs for a batch: JCS of its type, agent, network, size and root."""
        root = bytes(range(32))
        assert batch_signing_bytes("agent-a", "nl-ams-isp1", 500, root) == (
            b'{"agent":"agent-a","network":"nl-ams-isp1","root":"' + root.hex().encode()
            + b'","size":500,"type":"takedown-monitor/result-batch/v1"}'
        )  # fmt: skip

    def test_signature_binds_every_field(self) -> None:
        """A batch signature verifies over its root, and not once any observation's field
        changes (the root changes with it)."""
        key = AgentKey(Ed25519PrivateKey.generate())
        other = replace(OBSERVATION, seq=18, status=404)

        def signed(observations: list[Observation]) -> bytes:
            root = root_of([leaf_hash(observation_signing_bytes(o)) for o in observations])
            return batch_signing_bytes("agent-a", "nl-ams-isp1", len(observations), root)

        signature = key.sign(signed([OBSERVATION, other]))
        public = Ed25519PublicKey.from_public_bytes(key.public_key)
        public.verify(signature, signed([OBSERVATION, other]))
        for field, value in [("status", 404), ("started_at_us", 1), ("agent", "agent-b")]:
            changed = replace(OBSERVATION, **{field: value})
            with pytest.raises(InvalidSignature):
                public.verify(signature, signed([changed, other]))
        with pytest.raises(InvalidSignature):  # reordered, or one left out
            public.verify(signature, signed([other, OBSERVATION]))
        with pytest.raises(InvalidSignature):
            public.verify(signature, signed([OBSERVATION]))


def observation_leaf(obs: Observation = OBSERVATION, prev: int = -1) -> ObservationLeaf:
    return ObservationLeaf(obs, 4, 0, Attribution("Hoster A", 64500, False), 5, prev)


BATCH_LEAF = BatchLeaf("agent-a", "nl-ams-isp1", 3, bytes(range(32)), bytes(64), 11)


NOTICE = NoticeLeaf(
    url_sha256(URL), 1_700_000_000_000_000, 1_700_000_100_000_000, 0, 0,
    *NoticeLeaf.hashing_reference("HOTLINE-2024-0001"), BODY, 1_700_000_200_000_000, -1,
)  # fmt: skip
VERDICT = VerdictLeaf(
    url_sha256(URL), VerdictEvent.REMOVAL_CONFIRMED, "witness-quorum/3", 7, 1, 5, 6, 0, 0,
    (1, 2, 4), 3,
)  # fmt: skip
KEY_LEAF = AgentKeyLeaf("agent-a", "nl-ams-isp1", bytes(range(32)), 9)

hashes = st.binary(min_size=32, max_size=32)
small = st.integers(0, 2**53 - 1)
texts = st.text(max_size=20)
observations = st.builds(
    Observation, texts, texts, hashes, small, small, small, st.integers(0, 999),
    st.one_of(st.just(b""), hashes), st.one_of(st.just(b""), hashes), small, st.booleans(),
    texts, texts, small, st.booleans(), texts,
)  # fmt: skip
observation_leaves = st.builds(
    ObservationLeaf, observations, small, small,
    st.builds(Attribution, texts, small, st.booleans()), small, st.integers(-1, 2**40),
)  # fmt: skip
leaves: st.SearchStrategy[Leaf] = st.one_of(
    st.builds(AgentKeyLeaf, texts, texts, hashes, small),
    st.builds(BatchLeaf, texts, texts, st.integers(1, 2**20), hashes, st.binary(max_size=64),
              small),
    observation_leaves,
    st.builds(NoticeLeaf, hashes, small, small, small, small, texts,
              st.sampled_from(ReferenceForm), st.one_of(st.just(b""), hashes), small,
              st.integers(-1, 2**40)),
    st.builds(VerdictLeaf, hashes, st.sampled_from(VerdictEvent), texts, small, small, small,
              small, small, small, st.lists(small, max_size=5).map(tuple),
              st.integers(-1, 2**40)),
)  # fmt: skip


json_values = st.recursive(
    st.one_of(st.booleans(), st.integers(-(2**53) + 1, 2**53 - 1), st.text()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.from_regex(r"[a-z0-9_]{1,8}", fullmatch=True), inner, max_size=4),
    ),
    max_leaves=12,
)


class TestCanonical:
    @given(st.dictionaries(st.from_regex(r"[a-z0-9_]{1,8}", fullmatch=True), json_values))
    def test_equals_rfc8785(self, value: dict[str, Any]) -> None:
        """On the leaf value domain the fast encoder's bytes are the RFC 8785 reference's."""
        try:
            expected = rfc8785.dumps(value)
        except UnicodeEncodeError:
            with pytest.raises(MalformedLeaf):
                canonical(value)
            return
        assert canonical(value) == expected

    @given(leaves)
    def test_leaves_equal_rfc8785(self, leaf: Leaf) -> None:
        """Every leaf's bytes are exactly what a general JCS encoder makes of it."""
        assert encode_leaf(leaf) == rfc8785.dumps(leaf.to_json())

    @given(observation_leaves)
    def test_spliced_observation_leaf(self, leaf: ObservationLeaf) -> None:
        """The collector's observation leaf, spliced around the bytes its batch tree already
        made, is byte for byte the canonical encoding of the leaf."""
        try:
            expected = rfc8785.dumps(leaf.to_json())
        except UnicodeEncodeError:
            with pytest.raises(MalformedLeaf):
                encode_observation_leaf(
                    b"{}", leaf.batch, leaf.batch_index, leaf.attribution, 0, -1
                )
            return
        spliced = encode_observation_leaf(
            observation_signing_bytes(leaf.observation), leaf.batch, leaf.batch_index,
            leaf.attribution, leaf.received_at_us, leaf.url_prev,
        )  # fmt: skip
        assert spliced == expected

    @pytest.mark.parametrize(
        "value",
        [{"n": 2**53}, {"n": -(2**53)}, {"f": 1.5}, {"kéy": 1}, {"k": None}, {"k": b"x"}],
    )
    def test_outside_the_domain(self, value: dict[str, Any]) -> None:
        """Floats, null, bytes, huge integers and non-ASCII keys are refused."""
        with pytest.raises(MalformedLeaf):
            canonical(value)


class TestLeaves:
    @given(leaves)
    def test_round_trip(self, leaf: Leaf) -> None:
        """Every leaf decodes from its canonical bytes to itself."""
        assert decode_leaf(encode_leaf(leaf)) == leaf

    @pytest.mark.parametrize("leaf", [observation_leaf(), NOTICE, VERDICT, KEY_LEAF, BATCH_LEAF])
    def test_no_url_text(self, leaf: Leaf) -> None:
        """A leaf holds the URL only as its SHA-256: no part of the URL text appears."""
        data = encode_leaf(leaf)
        assert b"hoster.example" not in data
        assert b"reported" not in data
        assert b"HOTLINE" not in data

    def test_reference_hashed(self) -> None:
        """A hashed case reference is the hex SHA-256 of its text; an empty one is 'none'."""
        assert NOTICE.reference == hashlib.sha256(b"HOTLINE-2024-0001").hexdigest()
        assert NoticeLeaf.hashing_reference("") == ("", ReferenceForm.NONE)

    @pytest.mark.parametrize("leaf", [observation_leaf(), NOTICE, VERDICT, KEY_LEAF, BATCH_LEAF])
    def test_non_canonical_refused(self, leaf: Leaf) -> None:
        """The same JSON with spaces or keys in another order is not a leaf."""
        value = json.loads(encode_leaf(leaf))
        spaced = json.dumps(value, sort_keys=True).encode()
        unsorted = json.dumps(dict(reversed(value.items())), separators=(",", ":")).encode()
        for data in (spaced, unsorted):
            with pytest.raises(MalformedLeaf, match="canonical"):
                decode_leaf(data)

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            (lambda v: v.pop("url_prev"), "missing"),
            (lambda v: v.update(extra=1), "unknown"),
            (lambda v: v.update(asn="64500"), "asn is not an integer"),
            (lambda v: v.update(asn=True), "asn is not an integer"),
            (lambda v: v.update(v=1), "version 1 is not 2"),
            (lambda v: v["observation"].update(status=-1), "status"),
            (lambda v: v["observation"].update(body_sha256="AB" * 32), "body_sha256"),
            (lambda v: v["observation"].update(body_sha256="ab"), "body_sha256"),
            (lambda v: v["observation"].update(type="x"), "type"),
            (lambda v: v.update(batch=-1), "batch is not an integer"),
            (lambda v: v.update(leaf="photo"), "not a leaf"),
        ],
    )
    def test_malformed_fields_named(self, change: Any, message: str) -> None:
        """A missing, unknown or mistyped field is refused, naming the field."""
        value = json.loads(encode_leaf(observation_leaf()))
        change(value)
        with pytest.raises(MalformedLeaf, match=message):
            decode_leaf(canonical(value))

    def test_bad_batch_signature_encoding(self) -> None:
        """A batch leaf whose signature is not base64 is refused, naming the field."""
        value = json.loads(encode_leaf(BATCH_LEAF))
        value["signature"] = "***"
        with pytest.raises(MalformedLeaf, match=r"batch\.signature is not base64"):
            decode_leaf(canonical(value))

    def test_bad_verdict_fields(self) -> None:
        """A verdict with an unknown event or a basis that is not indices is refused."""
        for key, bad in (("event", "forgiven"), ("basis", [1, "2"])):
            value = json.loads(encode_leaf(VERDICT))
            value[key] = bad
            with pytest.raises(MalformedLeaf, match=key):
                decode_leaf(canonical(value))

    def test_short_hash_refused_at_construction(self) -> None:
        """An observation whose URL hash is not a SHA-256 cannot be made."""
        with pytest.raises(MalformedLeaf, match="url_sha256"):
            replace(OBSERVATION, url_sha256=b"short")


class TestAgentKey:
    def test_made_once_with_mode_0600(self, tmp_path: Path) -> None:
        """The first start makes agent.key (0600) and agent.pub; the next loads the same key."""
        first = AgentKey.load_or_create(tmp_path)
        assert stat.S_IMODE((tmp_path / "agent.key").stat().st_mode) == 0o600
        again = AgentKey.load_or_create(tmp_path)
        assert again.public_key == first.public_key
        public = serialization.load_pem_public_key((tmp_path / "agent.pub").read_bytes())
        assert isinstance(public, Ed25519PublicKey)
        public.verify(again.sign(b"x"), b"x")
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    def test_an_existing_key_wins(self, tmp_path: Path) -> None:
        """If another process made the key first, this one loads it instead of replacing it."""
        (tmp_path / "x").mkdir()
        other = AgentKey.load_or_create(tmp_path / "x")
        os.link(tmp_path / "x" / "agent.key", tmp_path / "agent.key")
        assert AgentKey.load_or_create(tmp_path).public_key == other.public_key

    def test_readable_by_others_refused(self, tmp_path: Path) -> None:
        """A key file that others may read is refused, saying how to fix it."""
        AgentKey.load_or_create(tmp_path)
        (tmp_path / "agent.key").chmod(0o604)
        with pytest.raises(AgentKeyError, match="chmod 600"):
            AgentKey.load(tmp_path / "agent.key")

    def test_readable_by_its_own_group_accepted(self, tmp_path: Path) -> None:
        """Group-readable by a group the agent is in (a Secret mounted with fsGroup) is fine;
        by a group it is not in, refused."""
        key = AgentKey.load_or_create(tmp_path)
        path = tmp_path / "agent.key"
        path.chmod(0o640)
        assert AgentKey.load(path).public_key == key.public_key
        foreign = max({os.getegid(), *os.getgroups()}) + 1
        os.chown(path, -1, foreign)
        if path.stat().st_gid == foreign:  # only root may give a file away
            with pytest.raises(AgentKeyError, match="chmod 600"):
                AgentKey.load(path)

    def test_not_ed25519_refused(self, tmp_path: Path) -> None:
        """A PEM key of another type, or a file that is not a key, is refused."""
        path = tmp_path / "ec.key"
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.write_bytes(pem)
        path.chmod(0o600)
        with pytest.raises(AgentKeyError, match="not Ed25519"):
            AgentKey.load(path)
        path.write_bytes(b"garbage")
        with pytest.raises(AgentKeyError, match="PEM"):
            AgentKey.load(path)
        with pytest.raises(AgentKeyError, match="cannot read"):
            AgentKey.load(tmp_path / "missing.key")

    def test_repr_shows_no_secret(self) -> None:
        """Printing the key shows the public half only."""
        key = AgentKey(Ed25519PrivateKey.generate())
        assert repr(key) == f"AgentKey(public_key={key.public_key.hex()})"


class TestSignedBatches:
    def test_one_signature_per_batch_as_the_collector_will_check(self) -> None:
        """`encode` with a signer gives each result its URL hash and signs the batch once,
        valid over the tree the collector rebuilds from the received bytes."""
        key = AgentKey(Ed25519PrivateKey.generate())
        urls = {1: URL, 2: "http://other.example/x"}
        signer = ResultSigner(key, "agent-a", "nl-ams-isp1", urls.get)
        batch = Batch(7, (
            ProbeResult(1, 1_700_000_000.1234567, 0.085, 200, URL, BODY, 5120, seq=10),
            ProbeResult(2, 1_700_000_001.5, 2.0, error=ErrorClass.READ_TIMEOUT, seq=11),
            ProbeResult(3, 1_700_000_002.0, 0.1, 404, seq=12),
        ))  # fmt: skip
        sent = pb.AgentMessage.FromString(encode(batch, 1.0, signer).SerializeToString()).batch
        # URL 3 is no longer assigned: no hash to sign it with, and the collector would drop it.
        assert [r.seq for r in sent.results] == [10, 11]
        assert [r.url_sha256 for r in sent.results] == [url_sha256(URL), url_sha256(urls[2])]
        tree = batch_tree("agent-a", "nl-ams-isp1", sent.results)
        expected = [
            observation_signing_bytes(observation_of("agent-a", "nl-ams-isp1",
                                                     url_sha256(urls[r.url_id]), r))
            for r in sent.results
        ]  # fmt: skip
        assert tree.data == expected
        public = Ed25519PublicKey.from_public_bytes(key.public_key)
        public.verify(
            sent.batch_signature, batch_signing_bytes("agent-a", "nl-ams-isp1", 2, tree.root)
        )
        unsigned = encode(batch, 1.0).batch
        assert unsigned.batch_signature == b"" and len(unsigned.results) == 3
