"""The log's leaves: canonical, content-free records, and the bytes an agent signs.

Every leaf is one JSON object in its RFC 8785 (JCS) canonical form: keys
sorted, no whitespace, integers in decimal. Only strings, integers below 2^53,
booleans, arrays and objects occur, so JCS amounts to `json.dumps` with sorted
keys and no spaces, which any language can reproduce. Hashes are lower-case
hex (empty when absent), signatures and keys standard base64, times integer
microseconds since the Unix epoch (0 = not known). A URL is only ever present
as the SHA-256 of its UTF-8 text: never the URL, never a body byte.

Five kinds, told apart by `"leaf"`:

- `agent_key`: an agent's Ed25519 public key, logged before its first
  observation, so a bundle can only use keys the log committed to in time;
- `batch`: one result batch as its agent signed it: the root of a Merkle tree
  over its observations (`batch_signing_bytes`) and the agent's signature, so
  one Ed25519 signature covers a whole batch;
- `observation`: what one agent saw of one URL once; `observation` is exactly
  the object the agent hashed into its batch tree (`observation_signing_bytes`),
  and the leaf adds where it sits in which batch and what the collector
  derived (attribution, arrival);
- `notice`: a report's clocks (received, notified, binding order);
- `verdict`: removal confirmed, reappearance, deadline passed, with the
  method version that decided it and the observations it rests on.

The per-URL leaves carry `url_prev`, the index of the previous leaf about the
same URL (-1 for the first): the leaves of a URL form a chain inside the log,
so a bundle that leaves one out breaks it. docs/EVIDENCE.md is the reference.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from collector.evidence.errors import MalformedLeaf

VERSION = 2
OBSERVATION_TYPE = "takedown-monitor/observation/v1"
BATCH_TYPE = "takedown-monitor/result-batch/v1"


class VerdictEvent(enum.StrEnum):
    """What a verdict leaf records."""

    REMOVAL_CONFIRMED = "removal_confirmed"
    REAPPEARANCE = "reappearance"
    DEADLINE_PASSED = "deadline_passed"


class ReferenceForm(enum.StrEnum):
    """How a notice leaf holds the hotline's case reference."""

    NONE = "none"
    TEXT = "text"  # as the hotline gave it
    SHA256 = "sha256"  # the hex SHA-256 of its UTF-8 text


def url_sha256(url: str) -> bytes:
    """The only form in which a URL enters a leaf: SHA-256 of its UTF-8 text."""
    return hashlib.sha256(url.encode("utf-8")).digest()


_SAFE_INT = 2**53 - 1


def _check_domain(value: object) -> None:
    """Refuse what JCS would encode differently from `json.dumps`, or not at all."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            assert isinstance(item, dict)
            for key in item:
                if type(key) is not str or not key.isascii():
                    raise MalformedLeaf(f"key {key!r} is not an ASCII string")
            stack.extend(item.values())
        elif kind is list:
            assert isinstance(item, list)
            stack.extend(item)
        elif kind is int:
            assert isinstance(item, int)
            if not -_SAFE_INT <= item <= _SAFE_INT:
                raise MalformedLeaf(f"{item} is beyond the integers JSON keeps exactly")
        elif kind is not str and kind is not bool:
            raise MalformedLeaf(f"a {kind.__name__} is not a leaf value")


def canonical(value: Mapping[str, Any]) -> bytes:
    """The RFC 8785 (JCS) bytes of a JSON object of the leaf value domain.

    Within that domain (ASCII keys, strings, booleans, integers of
    magnitude below 2^53, arrays and objects; no floats) JCS is exactly
    `json.dumps` with sorted keys, no spaces and UTF-8 output: ASCII keys sort
    the same by UTF-16 unit and by code point, and both escape only '"', '\\'
    and control characters, those without a short form as lower-case \\u00xx.
    This is several times faster than a general JCS encoder, which matters at
    one leaf per stored result; tests hold it to the `rfc8785` package.
    """
    _check_domain(value)
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MalformedLeaf("a string is not valid Unicode (a lone surrogate)") from exc


class _Reader:
    """Typed access to one parsed JSON object, naming the field that is wrong."""

    def __init__(self, value: object, what: str, keys: set[str]) -> None:
        if not isinstance(value, dict):
            raise MalformedLeaf(f"{what} is not a JSON object")
        missing, extra = keys - value.keys(), value.keys() - keys
        if missing or extra:
            raise MalformedLeaf(
                f"{what}: missing {sorted(missing) or 'nothing'}, unknown {sorted(extra) or 'none'}"
            )
        self.value: dict[str, Any] = value
        self.what = what

    def integer(self, key: str, low: int = 0) -> int:
        v = self.value[key]
        if type(v) is not int or v < low:
            raise MalformedLeaf(f"{self.what}.{key} is not an integer >= {low}")
        return v

    def text(self, key: str) -> str:
        v = self.value[key]
        if not isinstance(v, str):
            raise MalformedLeaf(f"{self.what}.{key} is not a string")
        return v

    def flag(self, key: str) -> bool:
        v = self.value[key]
        if not isinstance(v, bool):
            raise MalformedLeaf(f"{self.what}.{key} is not true or false")
        return v

    def digest(self, key: str, *, optional: bool = False) -> bytes:
        v = self.text(key)
        if optional and v == "":
            return b""
        if len(v) != 64 or v != v.lower():
            raise MalformedLeaf(f"{self.what}.{key} is not a lower-case hex SHA-256")
        try:
            return bytes.fromhex(v)
        except ValueError as exc:
            raise MalformedLeaf(f"{self.what}.{key} is not a lower-case hex SHA-256") from exc

    def blob(self, key: str) -> bytes:
        try:
            return base64.b64decode(self.text(key), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedLeaf(f"{self.what}.{key} is not base64") from exc

    def choice(self, key: str, kind: type[enum.StrEnum]) -> Any:
        try:
            return kind(self.text(key))
        except ValueError as exc:
            raise MalformedLeaf(
                f"{self.what}.{key} is not one of {[e.value for e in kind]}"
            ) from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class Observation:
    """What one agent saw of one URL at one moment, exactly as the agent signs it.

    `error` and `tls` are the wire enums' names in lower case without their
    prefix (`dns_nxdomain`, `verified`); `final_url_sha256` is empty when the
    agent got no response.
    """

    agent: str
    network: str
    url_sha256: bytes
    seq: int
    started_at_us: int
    elapsed_ms: int
    status: int
    final_url_sha256: bytes
    body_sha256: bytes
    body_bytes: int
    truncated: bool
    peer_ip: str
    error: str
    redirects: int
    challenge: bool
    tls: str

    _KEYS = frozenset(
        {"type", "agent", "network", "url_sha256", "seq", "started_at_us", "elapsed_ms",
         "status", "final_url_sha256", "body_sha256", "body_bytes", "truncated", "peer_ip",
         "error", "redirects", "challenge", "tls"}
    )  # fmt: skip

    def __post_init__(self) -> None:
        if len(self.url_sha256) != 32:
            raise MalformedLeaf("observation.url_sha256 is not a SHA-256")
        for name in ("final_url_sha256", "body_sha256"):
            if len(getattr(self, name)) not in (0, 32):
                raise MalformedLeaf(f"observation.{name} is neither empty nor a SHA-256")

    def to_json(self) -> dict[str, Any]:
        return {
            "type": OBSERVATION_TYPE,
            "agent": self.agent,
            "network": self.network,
            "url_sha256": self.url_sha256.hex(),
            "seq": self.seq,
            "started_at_us": self.started_at_us,
            "elapsed_ms": self.elapsed_ms,
            "status": self.status,
            "final_url_sha256": self.final_url_sha256.hex(),
            "body_sha256": self.body_sha256.hex(),
            "body_bytes": self.body_bytes,
            "truncated": self.truncated,
            "peer_ip": self.peer_ip,
            "error": self.error,
            "redirects": self.redirects,
            "challenge": self.challenge,
            "tls": self.tls,
        }

    @classmethod
    def from_json(cls, value: object) -> Observation:
        r = _Reader(value, "observation", set(cls._KEYS))
        if r.text("type") != OBSERVATION_TYPE:
            raise MalformedLeaf(f"observation.type is not {OBSERVATION_TYPE!r}")
        return cls(
            agent=r.text("agent"),
            network=r.text("network"),
            url_sha256=r.digest("url_sha256"),
            seq=r.integer("seq"),
            started_at_us=r.integer("started_at_us"),
            elapsed_ms=r.integer("elapsed_ms"),
            status=r.integer("status"),
            final_url_sha256=r.digest("final_url_sha256", optional=True),
            body_sha256=r.digest("body_sha256", optional=True),
            body_bytes=r.integer("body_bytes"),
            truncated=r.flag("truncated"),
            peer_ip=r.text("peer_ip"),
            error=r.text("error"),
            redirects=r.integer("redirects"),
            challenge=r.flag("challenge"),
            tls=r.text("tls"),
        )


def observation_signing_bytes(observation: Observation) -> bytes:
    """The bytes of one result that its agent hashes into its batch tree (a leaf of it)."""
    return canonical(observation.to_json())


def batch_signing_bytes(agent: str, network: str, size: int, root: bytes) -> bytes:
    """What an agent signs for one batch: the RFC 6962 root over its observations' bytes."""
    return canonical(
        {"type": BATCH_TYPE, "agent": agent, "network": network, "size": size, "root": root.hex()}
    )


@dataclass(frozen=True)
class AgentKeyLeaf:
    """An agent's public key as the collector accepted it (registered, or pinned at hello)."""

    agent: str
    network: str
    public_key: bytes
    accepted_at_us: int

    def to_json(self) -> dict[str, Any]:
        return {
            "leaf": "agent_key",
            "v": VERSION,
            "agent": self.agent,
            "network": self.network,
            "public_key": _b64(self.public_key),
            "accepted_at_us": self.accepted_at_us,
        }

    @classmethod
    def _from(cls, r: _Reader) -> AgentKeyLeaf:
        key = r.blob("public_key")
        if len(key) != 32:
            raise MalformedLeaf("agent_key.public_key is not a 32-byte Ed25519 key")
        return cls(r.text("agent"), r.text("network"), key, r.integer("accepted_at_us"))


@dataclass(frozen=True)
class BatchLeaf:
    """A batch as its agent signed it: `size` observations under `root`, and the signature."""

    agent: str
    network: str
    size: int
    root: bytes  # RFC 6962 root over the leaf hashes of the observations' signing bytes
    signature: bytes  # the agent's Ed25519 signature over batch_signing_bytes; empty if unsigned
    received_at_us: int

    def signing_bytes(self) -> bytes:
        return batch_signing_bytes(self.agent, self.network, self.size, self.root)

    def to_json(self) -> dict[str, Any]:
        return {
            "leaf": "batch",
            "v": VERSION,
            "agent": self.agent,
            "network": self.network,
            "size": self.size,
            "root": self.root.hex(),
            "signature": _b64(self.signature),
            "received_at_us": self.received_at_us,
        }

    @classmethod
    def _from(cls, r: _Reader) -> BatchLeaf:
        return cls(
            r.text("agent"),
            r.text("network"),
            r.integer("size", low=1),
            r.digest("root"),
            r.blob("signature"),
            r.integer("received_at_us"),
        )


@dataclass(frozen=True)
class Attribution:
    """Who hosted the address the agent connected to, as the collector attributed it."""

    provider: str
    asn: int
    cdn: bool


@dataclass(frozen=True)
class ObservationLeaf:
    """An observation as stored: the agent's part, its place in a signed batch, the
    collector's part."""

    observation: Observation
    batch: int  # the log index of the batch leaf whose tree holds the observation
    batch_index: int  # its position in that batch
    attribution: Attribution
    received_at_us: int  # collector clock when stored
    url_prev: int

    @property
    def url_sha256(self) -> bytes:
        return self.observation.url_sha256

    def to_json(self) -> dict[str, Any]:
        return {
            "leaf": "observation",
            "v": VERSION,
            "observation": self.observation.to_json(),
            "batch": self.batch,
            "batch_index": self.batch_index,
            "provider": self.attribution.provider,
            "asn": self.attribution.asn,
            "cdn": self.attribution.cdn,
            "received_at_us": self.received_at_us,
            "url_prev": self.url_prev,
        }

    @classmethod
    def _from(cls, r: _Reader) -> ObservationLeaf:
        return cls(
            Observation.from_json(r.value["observation"]),
            r.integer("batch"),
            r.integer("batch_index"),
            Attribution(r.text("provider"), r.integer("asn"), r.flag("cdn")),
            r.integer("received_at_us"),
            r.integer("url_prev", low=-1),
        )


@dataclass(frozen=True)
class NoticeLeaf:
    """A report's clocks: when it was received, when the hoster was notified, any order."""

    url_sha256: bytes
    received_at_us: int
    notified_at_us: int
    order_issued_at_us: int  # 0: no binding order
    order_deadline_seconds: int  # 0: none, or the collector's default
    reference: str
    reference_form: ReferenceForm
    content_sha256: bytes  # the hotline's hash of the reported content; empty if none
    logged_at_us: int
    url_prev: int

    @classmethod
    def hashing_reference(cls, reference: str) -> tuple[str, ReferenceForm]:
        """A case reference in its hashed form, for hotlines whose ids are sensitive."""
        if not reference:
            return "", ReferenceForm.NONE
        return hashlib.sha256(reference.encode()).hexdigest(), ReferenceForm.SHA256

    def to_json(self) -> dict[str, Any]:
        return {
            "leaf": "notice",
            "v": VERSION,
            "url_sha256": self.url_sha256.hex(),
            "received_at_us": self.received_at_us,
            "notified_at_us": self.notified_at_us,
            "order_issued_at_us": self.order_issued_at_us,
            "order_deadline_seconds": self.order_deadline_seconds,
            "reference": self.reference,
            "reference_form": self.reference_form.value,
            "content_sha256": self.content_sha256.hex(),
            "logged_at_us": self.logged_at_us,
            "url_prev": self.url_prev,
        }

    @classmethod
    def _from(cls, r: _Reader) -> NoticeLeaf:
        return cls(
            r.digest("url_sha256"),
            r.integer("received_at_us"),
            r.integer("notified_at_us"),
            r.integer("order_issued_at_us"),
            r.integer("order_deadline_seconds"),
            r.text("reference"),
            r.choice("reference_form", ReferenceForm),
            r.digest("content_sha256", optional=True),
            r.integer("logged_at_us"),
            r.integer("url_prev", low=-1),
        )


@dataclass(frozen=True)
class VerdictLeaf:
    """A verdict event with its times and the method version that decided it."""

    url_sha256: bytes
    event: VerdictEvent
    method: str
    decided_at_us: int
    episode: int
    last_present_us: int  # removal: the interval's start; reappearance: when seen again
    first_removed_us: int  # removal: the interval's end
    deadline_seconds: int  # deadline_passed: the regime's deadline; otherwise 0
    deadline_at_us: int
    basis: tuple[int, ...]  # log indices of the observations the verdict rests on
    url_prev: int

    def to_json(self) -> dict[str, Any]:
        return {
            "leaf": "verdict",
            "v": VERSION,
            "url_sha256": self.url_sha256.hex(),
            "event": self.event.value,
            "method": self.method,
            "decided_at_us": self.decided_at_us,
            "episode": self.episode,
            "last_present_us": self.last_present_us,
            "first_removed_us": self.first_removed_us,
            "deadline_seconds": self.deadline_seconds,
            "deadline_at_us": self.deadline_at_us,
            "basis": list(self.basis),
            "url_prev": self.url_prev,
        }

    @classmethod
    def _from(cls, r: _Reader) -> VerdictLeaf:
        basis = r.value["basis"]
        if not isinstance(basis, list) or any(type(i) is not int or i < 0 for i in basis):
            raise MalformedLeaf("verdict.basis is not a list of leaf indices")
        return cls(
            r.digest("url_sha256"),
            r.choice("event", VerdictEvent),
            r.text("method"),
            r.integer("decided_at_us"),
            r.integer("episode"),
            r.integer("last_present_us"),
            r.integer("first_removed_us"),
            r.integer("deadline_seconds"),
            r.integer("deadline_at_us"),
            tuple(basis),
            r.integer("url_prev", low=-1),
        )


Leaf: TypeAlias = AgentKeyLeaf | BatchLeaf | ObservationLeaf | NoticeLeaf | VerdictLeaf
UrlLeaf: TypeAlias = ObservationLeaf | NoticeLeaf | VerdictLeaf

_KINDS: dict[str, tuple[type[Leaf], frozenset[str]]] = {
    "agent_key": (AgentKeyLeaf, frozenset(AgentKeyLeaf(".", "", bytes(32), 0).to_json())),
    "batch": (BatchLeaf, frozenset(BatchLeaf("", "", 1, bytes(32), b"", 0).to_json())),
    "observation": (ObservationLeaf, frozenset(
        {"leaf", "v", "observation", "batch", "batch_index", "provider", "asn", "cdn",
         "received_at_us", "url_prev"}
    )),
    "notice": (NoticeLeaf, frozenset(
        NoticeLeaf(bytes(32), 0, 0, 0, 0, "", ReferenceForm.NONE, b"", 0, -1).to_json()
    )),
    "verdict": (VerdictLeaf, frozenset(
        VerdictLeaf(bytes(32), VerdictEvent.REAPPEARANCE, "", 0, 0, 0, 0, 0, 0, (), -1).to_json()
    )),
}  # fmt: skip


def encode_leaf(leaf: Leaf) -> bytes:
    """The canonical bytes of a leaf: what the log hashes (`merkle.leaf_hash`)."""
    return canonical(leaf.to_json())


def _json_text(text: str) -> bytes:
    return json.dumps(text, ensure_ascii=False).encode("utf-8")


def encode_observation_leaf(
    observation_bytes: bytes,
    batch: int,
    batch_index: int,
    attribution: Attribution,
    received_at_us: int,
    url_prev: int,
) -> bytes:
    """`encode_leaf` of the ObservationLeaf of these parts, given the observation's signing
    bytes already made for its batch tree.

    The collector makes those bytes once per result to check the batch; splicing them into
    the leaf instead of encoding the observation again halves the log's encoding cost. The
    keys are written in their sorted order; tests hold this to `encode_leaf`.
    """
    a = attribution
    for value in (batch, batch_index, a.asn, received_at_us, url_prev):
        if type(value) is not int or not -_SAFE_INT <= value <= _SAFE_INT:
            raise MalformedLeaf(f"{value!r} is not an integer JSON keeps exactly")
    try:
        provider = _json_text(a.provider)
    except UnicodeEncodeError as exc:
        raise MalformedLeaf("a string is not valid Unicode (a lone surrogate)") from exc
    return b"".join((
        b'{"asn":%d,"batch":%d,"batch_index":%d,"cdn":%s,"leaf":"observation","observation":'
        % (a.asn, batch, batch_index, b"true" if a.cdn else b"false"),
        observation_bytes,
        b',"provider":', provider,
        b',"received_at_us":%d,"url_prev":%d,"v":%d}' % (received_at_us, url_prev, VERSION),
    ))  # fmt: skip


def leaf_from_json(value: object) -> Leaf:
    """The leaf a parsed JSON object holds; MalformedLeaf naming what is wrong."""
    if not isinstance(value, dict) or value.get("leaf") not in _KINDS:
        raise MalformedLeaf(f"not a leaf: 'leaf' is not one of {sorted(_KINDS)}")
    kind, keys = _KINDS[value["leaf"]]
    r = _Reader(value, str(value["leaf"]), set(keys))
    if r.integer("v") != VERSION:
        raise MalformedLeaf(f"{r.what} leaf version {value['v']} is not {VERSION}")
    return kind._from(r)


def decode_leaf(data: bytes) -> Leaf:
    """The leaf whose canonical bytes are `data`; bytes not in canonical form are refused."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedLeaf(f"not JSON: {exc}") from exc
    leaf = leaf_from_json(value)
    if encode_leaf(leaf) != data:
        raise MalformedLeaf("not in canonical (RFC 8785) form")
    return leaf
