"""Evidence on real components: signing agents → collector with a log key → export → verify.

The stream tests speak AgentLink by hand to a real grpc.aio collector, so each
can send exactly the wrong thing: a forged signature, a missing one, another
key under a pinned name. The flow test runs two real agents against a real
hoster, exports the removed URL's bundle with the command a regulator's
contact would run, verifies it offline and then tampers with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.keys import AgentKey, ResultSigner
from agent.main import Agent
from collector.cli import main
from collector.evidence.bundle import read_bundle
from collector.evidence.leaves import url_sha256
from collector.evidence.logkey import init_log_key
from collector.evidence.note import NoteVerifier
from collector.evidence.verify import Report, verify_bundle
from collector.importer import import_file
from collector.server import Collector
from collector.store.reads import connect_readonly, results_count, url_statuses
from demo.hoster import Fate, Hoster
from protos.takedown.v1 import takedown_pb2 as pb
from protos.takedown.v1 import takedown_pb2_grpc as pb_grpc
from tests.conftest import HOST_A, agent_config, eventually, logging_collector

pytestmark = pytest.mark.integration

NOW_US = int(time.time() * 1_000_000)
URL = "http://a.example/reported"


@pytest.fixture
def log_key(tmp_path: Path) -> tuple[Path, NoteVerifier]:
    private, verifier = init_log_key(tmp_path / "log-key", "test.takedown/log")
    return private, verifier


@pytest.fixture
async def collector(
    tmp_path: Path, prefixes: Path, log_key: tuple[Path, NoteVerifier]
) -> AsyncIterator[Collector]:
    async with logging_collector(tmp_path, prefixes, log_key[0]) as c:
        yield c


@pytest.fixture
async def channel(collector: Collector) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as ch:
        yield ch


async def submit(channel: grpc.aio.Channel, url: str = URL) -> int:
    stub = pb_grpc.IntakeStub(channel)
    reply = await stub.Submit(
        pb.SubmitRequest(reports=[pb.Report(url=url, notified_at_unix_us=NOW_US)])
    )
    assert reply.outcomes[0].status == pb.SUBMIT_STATUS_ACCEPTED
    return int(reply.outcomes[0].url_id)


def result(url_id: int, seq: int, status: int = 200) -> pb.ProbeResult:
    return pb.ProbeResult(
        url_id=url_id, seq=seq, started_at_unix_us=NOW_US + seq, status=status,
        body_sha256=hashlib.sha256(b"x").digest() if status == 200 else b"",
        peer_ip="127.0.0.10", final_url=URL, elapsed_ms=3,
    )  # fmt: skip


def signer(key: AgentKey, name: str = "signer", urls: dict[int, str] | None = None) -> ResultSigner:
    return ResultSigner(key, name, "net", (urls or {}).get)


async def hello(
    channel: grpc.aio.Channel, public_key: bytes, name: str = "signer"
) -> grpc.aio.StreamStreamCall[pb.AgentMessage, pb.CollectorMessage]:
    call = pb_grpc.AgentLinkStub(channel).Connect()  # type: ignore[call-arg]
    await call.write(
        pb.AgentMessage(
            hello=pb.Hello(agent=name, network="net", version="t", public_key=public_key)
        )
    )
    return call


async def signed_stream(
    channel: grpc.aio.Channel,
) -> tuple[int, grpc.aio.StreamStreamCall[pb.AgentMessage, pb.CollectorMessage], ResultSigner]:
    """A reported URL, and an agent with a new key that said hello: (url id, call, signer)."""
    url_id = await submit(channel)
    key = AgentKey(Ed25519PrivateKey.generate())
    call = await hello(channel, key.public_key)
    return url_id, call, signer(key, urls={url_id: URL})


async def first_of(
    call: grpc.aio.StreamStreamCall[pb.AgentMessage, pb.CollectorMessage], kind: str
) -> pb.CollectorMessage:
    while True:
        message = await call.read()
        assert message is not grpc.aio.EOF, f"the stream ended before a {kind}"
        if message.WhichOneof("kind") == kind:
            return message


async def refused(
    call: grpc.aio.StreamStreamCall[pb.AgentMessage, pb.CollectorMessage],
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(10):
            while await call.read() is not grpc.aio.EOF:
                pass
    return caught.value


def stored(collector: Collector, agent: str = "signer") -> int:
    conn = connect_readonly(collector.config.db)
    try:
        return results_count(conn, agent)
    finally:
        conn.close()


def leaf_kinds(collector: Collector) -> list[str]:
    conn = connect_readonly(collector.config.db)
    try:
        return [k for (k,) in conn.execute("SELECT kind FROM log_leaves ORDER BY idx")]
    finally:
        conn.close()


def signed(s: ResultSigner, results: list[pb.ProbeResult], batch_id: int = 1) -> pb.ResultBatch:
    """A batch as the agent's link sends it: each result given its URL hash, one signature."""
    kept, signature = s.sign(results)
    return pb.ResultBatch(batch_id=batch_id, results=kept, batch_signature=signature)


class TestStream:
    async def test_signed_batch_is_stored_and_logged(
        self, channel: grpc.aio.Channel, collector: Collector
    ) -> None:
        """A valid signature: stored, acked, the batch leaf then one observation leaf per
        result, after the key."""
        url_id, call, s = await signed_stream(channel)
        await call.write(pb.AgentMessage(batch=signed(s, [result(url_id, n) for n in (1, 2, 3)])))
        ack = await first_of(call, "ack")
        assert (ack.ack.stored, ack.ack.rejected) == (3, 0)
        call.cancel()
        assert leaf_kinds(collector) == ["notice", "agent_key", "batch", *["observation"] * 3]

    async def test_bad_signature_ends_the_stream_and_stores_nothing(
        self, channel: grpc.aio.Channel, collector: Collector
    ) -> None:
        """One result sent other than signed: INVALID_ARGUMENT naming the batch, nothing
        stored."""
        url_id, call, s = await signed_stream(channel)
        signed_as = [result(url_id, 1), result(url_id, 2, status=404), result(url_id, 3)]
        batch = signed(s, signed_as)
        batch.results[1].status = 200  # signed: 404; sent: 200
        batch.results[1].body_sha256 = hashlib.sha256(b"x").digest()
        await call.write(pb.AgentMessage(batch=batch))
        error = await refused(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "batch 1: its signature does not verify" in (error.details() or "")
        assert "nothing of this batch was stored" in (error.details() or "")
        assert stored(collector) == 0
        assert "observation" not in leaf_kinds(collector)

    async def test_another_agents_signature_is_refused(
        self, channel: grpc.aio.Channel, collector: Collector
    ) -> None:
        """Results signed with a key other than the one in the hello are refused."""
        url_id = await submit(channel)
        key, other = (AgentKey(Ed25519PrivateKey.generate()) for _ in range(2))
        call = await hello(channel, key.public_key)
        forged = signed(signer(other, urls={url_id: URL}), [result(url_id, 1)])
        await call.write(pb.AgentMessage(batch=forged))
        assert (await refused(call)).code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stored(collector) == 0

    async def test_missing_signature_is_refused(
        self, channel: grpc.aio.Channel, collector: Collector
    ) -> None:
        """An agent that said hello with a key must sign every batch."""
        url_id = await submit(channel)
        key = AgentKey(Ed25519PrivateKey.generate())
        call = await hello(channel, key.public_key)
        await call.write(
            pb.AgentMessage(batch=pb.ResultBatch(batch_id=1, results=[result(url_id, 1)]))
        )
        error = await refused(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "batch 1 has no signature" in (error.details() or "")
        assert stored(collector) == 0

    async def test_missing_url_hash_is_refused(
        self, channel: grpc.aio.Channel, collector: Collector
    ) -> None:
        """A signed batch must give each result its URL hash (the tree is built from it)."""
        url_id, call, s = await signed_stream(channel)
        batch = signed(s, [result(url_id, 1), result(url_id, 2)])
        batch.results[1].url_sha256 = b""
        await call.write(pb.AgentMessage(batch=batch))
        error = await refused(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "result seq 2 has no url_sha256" in (error.details() or "")
        assert stored(collector) == 0

    async def test_pinned_key_cannot_change_or_vanish(
        self, channel: grpc.aio.Channel, collector: Collector
    ) -> None:
        """After the first hello pinned a key, another key or none is PERMISSION_DENIED."""
        key = AgentKey(Ed25519PrivateKey.generate())
        first = await hello(channel, key.public_key)
        await first_of(first, "welcome")
        first.cancel()
        for other in (AgentKey(Ed25519PrivateKey.generate()).public_key, b""):
            call = await hello(channel, other)
            error = await refused(call)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "pinned public key" in (error.details() or "")
        assert leaf_kinds(collector).count("agent_key") == 1

    async def test_a_result_no_observation_can_hold_is_refused_by_name(
        self, channel: grpc.aio.Channel, collector: Collector
    ) -> None:
        """A seq beyond what the canonical JSON of a leaf keeps exactly (2^53): the batch is
        refused as invalid, saying why, and nothing of it is stored."""
        url_id, call, _ = await signed_stream(channel)
        results = [result(url_id, 1), result(url_id, 2)]
        results[1].seq = 2**60
        results[1].url_sha256 = url_sha256(URL)
        results[0].url_sha256 = url_sha256(URL)
        batch = pb.ResultBatch(batch_id=1, results=results, batch_signature=bytes(64))
        await call.write(pb.AgentMessage(batch=batch))
        error = await refused(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "a result cannot be an observation" in (error.details() or "")
        assert stored(collector) == 0

    async def test_unassigned_or_misnamed_result_is_refused_alone(
        self, channel: grpc.aio.Channel, collector: Collector
    ) -> None:
        """In a validly signed batch, a result of a URL never reported, and one whose URL
        hash names another URL than its id, are each refused alone; the rest is stored."""
        url_id, call, s = await signed_stream(channel)
        good = signed(s, [result(url_id, 1)])
        unknown = signer(s.key, urls={url_id: URL, 999_999: "http://never.example/x"})
        batch = signed(unknown, [result(url_id, 2), result(999_999, 3)], batch_id=2)
        misnamed = signer(s.key, urls={url_id: "http://another.example/page"})
        wrong = signed(misnamed, [result(url_id, 4), result(url_id, 5)], batch_id=3)
        for b in (good, batch, wrong):
            await call.write(pb.AgentMessage(batch=b))
        acks = [(await first_of(call, "ack")).ack for _ in range(3)]
        assert [(a.stored, a.rejected) for a in acks] == [(1, 0), (1, 1), (0, 2)]
        call.cancel()
        assert stored(collector) == 2

    async def test_agent_without_a_key_is_logged_unsigned(
        self, channel: grpc.aio.Channel, collector: Collector
    ) -> None:
        """An agent without a key: its results are stored and logged in an unsigned batch the
        collector built over the URLs it knows; a result of an unknown URL id is refused."""
        url_id = await submit(channel)
        call = await hello(channel, b"", name="keyless")
        batch = pb.ResultBatch(batch_id=1, results=[result(url_id, 1), result(999_999, 2)])
        await call.write(pb.AgentMessage(batch=batch))
        ack = (await first_of(call, "ack")).ack
        assert (ack.stored, ack.rejected) == (1, 1)
        call.cancel()
        conn = connect_readonly(collector.config.db)
        try:
            rows = conn.execute("SELECT kind, leaf FROM log_leaves ORDER BY idx").fetchall()
        finally:
            conn.close()
        assert [k for k, _ in rows] == ["notice", "batch", "observation"]
        leaf = json.loads(bytes(rows[1][1]))
        assert (leaf["agent"], leaf["size"], leaf["signature"]) == ("keyless", 1, "")
        assert json.loads(bytes(rows[2][1]))["observation"]["url_sha256"] == url_sha256(URL).hex()

    async def test_registered_key_is_required_at_first_hello(
        self, tmp_path: Path, channel: grpc.aio.Channel, collector: Collector
    ) -> None:
        """`agents add --public-key` pins the key before the agent ever connects."""
        (tmp_path / "agent-state").mkdir(mode=0o700)
        key = AgentKey.load_or_create(tmp_path / "agent-state")
        code = main(["agents", "add", "signer", "--db", str(collector.config.db),
                     "--public-key", str(tmp_path / "agent-state" / "agent.pub")])  # fmt: skip
        assert code == 0
        wrong = await hello(channel, AgentKey(Ed25519PrivateKey.generate()).public_key)
        assert (await refused(wrong)).code() == grpc.StatusCode.PERMISSION_DENIED
        right = await hello(channel, key.public_key)
        await first_of(right, "welcome")
        right.cancel()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["agents", "list", "--db", str(collector.config.db)]) == 0
        assert f"ed25519:{key.public_key.hex()}" in out.getvalue()


class TestDeadlines:
    async def test_passed_deadline_is_logged_once(
        self, channel: grpc.aio.Channel, collector: Collector
    ) -> None:
        """Content online past the 1 h deadline: one deadline_passed verdict per deadline."""
        stub = pb_grpc.IntakeStub(channel)
        notified = NOW_US - 7200 * 1_000_000
        reply = await stub.Submit(
            pb.SubmitRequest(reports=[pb.Report(url=URL, notified_at_unix_us=notified)])
        )
        url_id = reply.outcomes[0].url_id
        for name in ("seer-1", "seer-2"):  # two networks see it: online
            key = AgentKey(Ed25519PrivateKey.generate())
            call = pb_grpc.AgentLinkStub(channel).Connect()  # type: ignore[call-arg]
            hello = pb.Hello(agent=name, network=name, version="t", public_key=key.public_key)
            await call.write(pb.AgentMessage(hello=hello))
            s = ResultSigner(key, name, name, {url_id: URL}.get)
            batch = signed(s, [result(url_id, n) for n in (1, 2)])
            await call.write(pb.AgentMessage(batch=batch))
            await first_of(call, "ack")
            call.cancel()
        await collector.writer.run(lambda s: s.flush(time.time()))
        await collector.replan()
        await collector.replan()
        conn = connect_readonly(collector.config.db)
        try:
            leaves = [
                json.loads(bytes(b))
                for (b,) in conn.execute("SELECT leaf FROM log_leaves WHERE kind = 'verdict'")
            ]
            checkpoints = conn.execute("SELECT MAX(size) FROM log_checkpoints").fetchone()[0]
            (size,) = conn.execute("SELECT COUNT(*) FROM log_leaves").fetchone()
        finally:
            conn.close()
        deadlines = [v for v in leaves if v["event"] == "deadline_passed"]
        assert [v["deadline_seconds"] for v in deadlines] == [3600]  # 24 h has not passed
        assert deadlines[0]["deadline_at_us"] == notified + 3600 * 1_000_000
        assert checkpoints == size  # a checkpoint covers the verdict at once


def entries(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (directory / "entries.jsonl").read_text().splitlines()]


def save(directory: Path, rows: list[dict[str, Any]]) -> None:
    (directory / "entries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def check(directory: Path, verifier: NoteVerifier) -> Report:
    return verify_bundle(read_bundle(directory), verifier)


def copy_bundle(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_bundle_of_a_real_run_verifies_and_any_tampering_is_named(
    tmp_path: Path, prefixes: Path, hoster: Hoster, log_key: tuple[Path, NoteVerifier],
    engine: str, request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    """Two signing agents see a page removed; its bundle verifies offline, tampering does not.
    On PostgreSQL too: the log, its proofs and the export are the same SQL."""
    key_file, verifier = log_key
    on: dict[str, Any] = {"db": request.getfixturevalue("pg_dsn")} if engine == "postgresql" else {}
    hoster.add("/removed")
    hoster.add("/online")
    url = f"http://{HOST_A}:{hoster.port}/removed"
    notified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    reports = tmp_path / "reports.csv"
    reports.write_text(
        f"url,notified_at,reference\n{url},{notified},CASE-77\n"
        f"http://{HOST_A}:{hoster.port}/online,{notified},CASE-78\n"
    )
    async with logging_collector(tmp_path, prefixes, key_file, **on) as collector:
        db = collector.config.db
        assert (
            await import_file(reports, f"127.0.0.1:{collector.grpc_port}", out=io.StringIO()) == 0
        )
        stops, tasks = [], []
        for n, source in enumerate(("127.0.0.2", "127.0.0.3"), 1):
            config = agent_config(
                collector, f"agent-{n}", f"net-{n}", source, state_dir=tmp_path / f"agent-{n}"
            )
            stop = asyncio.Event()
            stops.append(stop)
            tasks.append(asyncio.create_task(Agent(config, rng=random.Random(n)).run(stop)))

        def state_of(path: str) -> str:
            conn = connect_readonly(db)
            try:
                return {s.url.rsplit("/", 1)[1]: s.state for s in url_statuses(conn)}[path]
            finally:
                conn.close()

        try:
            await eventually(lambda: state_of("removed") == "available", 20, "seen online")
            hoster.set_fate("/removed", Fate.GONE_404)
            await eventually(lambda: state_of("removed") == "removed", 30, "removal confirmed")
        finally:
            for stop in stops:
                stop.set()
            for task in tasks:
                await asyncio.wait_for(task, timeout=15)

    bundle = tmp_path / "bundle"
    vkey = tmp_path / "log-key" / "log.vkey"
    args = ["evidence", "export", url, "--db", str(db), "-o", str(bundle), "--log-key", str(vkey)]
    assert main(args) == 0
    report = check(bundle, verifier)
    assert report.problems == []
    assert report.agents == {"agent-1", "agent-2"}
    assert report.urls == 1 and report.observations >= 4
    rows = entries(bundle)
    kinds = [r["leaf"]["leaf"] for r in rows]
    assert kinds.count("notice") == 1 and kinds.count("agent_key") == 2
    verdicts = [r["leaf"] for r in rows if r["leaf"]["leaf"] == "verdict"]
    assert [v["event"] for v in verdicts] == ["removal_confirmed"]
    assert verdicts[0]["method"].startswith("tm-")
    # The verdict names what it rests on: each witness's last present and the k = 2 removed
    # observations after it that confirmed (both agents saw the page, so both are witnesses).
    by_index = {r["index"]: r["leaf"] for r in rows}
    basis = verdicts[0]["basis"]
    assert basis and all(by_index[i]["leaf"] == "observation" for i in basis), basis
    rested_on = [by_index[i]["observation"] for i in basis]
    assert {o["agent"] for o in rested_on} == {"agent-1", "agent-2"}
    for name in ("agent-1", "agent-2"):
        mine = [o for o in rested_on if o["agent"] == name]
        present = [o["started_at_us"] for o in mine if o["status"] == 200]
        removed = [o["started_at_us"] for o in mine if o["status"] == 404]
        assert present and len(removed) >= 2 and max(present) < min(removed), (name, mine)
    for path in bundle.iterdir():  # no URL, no case reference, no body byte
        data = path.read_bytes()
        for marker in (url.encode(), b"/removed", b"CASE-77", hoster.marker.encode()):
            assert marker not in data, (path.name, marker)

    observed = [i for i, r in enumerate(rows) if r["leaf"]["leaf"] == "observation"]
    signed_by = {rows[i]["leaf"]["observation"]["agent"] for i in observed}
    assert signed_by == {"agent-1", "agent-2"}

    def tampered(name: str, change: Any) -> set[str]:
        directory = copy_bundle(bundle, tmp_path / f"tampered-{name}")
        copy = entries(directory)
        change(copy, directory)
        save(directory, copy)
        return check(directory, verifier).checks()

    def status(rows: list[dict[str, Any]], _: Path) -> None:
        rows[observed[0]]["leaf"]["observation"]["status"] = 200 + 1

    def when(rows: list[dict[str, Any]], _: Path) -> None:
        rows[observed[0]]["leaf"]["observation"]["started_at_us"] += 1_000_000

    def dropped(rows: list[dict[str, Any]], _: Path) -> None:
        del rows[observed[1]]

    def dropped_basis(rows: list[dict[str, Any]], _: Path) -> None:
        at = next(i for i, r in enumerate(rows) if r["index"] == basis[-1])
        del rows[at]

    def reordered(rows: list[dict[str, Any]], _: Path) -> None:
        a, b = observed[0], observed[1]
        rows[a], rows[b] = rows[b], rows[a]

    def swapped(rows: list[dict[str, Any]], _: Path) -> None:
        a, b = [r["leaf"] for r in rows if r["leaf"]["leaf"] == "batch" and
                r["leaf"]["agent"] == "agent-1"][:2]  # fmt: skip
        a["signature"], b["signature"] = b["signature"], a["signature"]

    def moved(rows: list[dict[str, Any]], _: Path) -> None:
        mine = [i for i in observed if rows[i]["leaf"]["observation"]["agent"] == "agent-1"]
        later = rows[mine[-1]]["leaf"]
        later["batch"], later["batch_index"] = rows[mine[0]]["leaf"]["batch"], 0

    def other_key(rows: list[dict[str, Any]], _: Path) -> None:
        keys = [r["leaf"] for r in rows if r["leaf"]["leaf"] == "agent_key"]
        keys[0]["public_key"] = keys[1]["public_key"]

    def checkpoint(_: list[dict[str, Any]], directory: Path) -> None:
        path = directory / "checkpoint.txt"
        lines = path.read_text().split("\n")
        lines[1] = str(int(lines[1]) - 1)  # the tree size
        path.write_text("\n".join(lines))

    assert tampered("status", status) >= {"signature", "inclusion"}
    assert tampered("time", when) >= {"signature", "inclusion"}
    assert "chain" in tampered("dropped", dropped)
    assert {"chain", "basis"} <= tampered("dropped-basis", dropped_basis)
    assert "order" in tampered("reordered", reordered)
    assert "signature" in tampered("swapped", swapped)
    assert "signature" in tampered("moved", moved)
    assert "signature" in tampered("key", other_key)
    assert "checkpoint" in tampered("checkpoint", checkpoint)


CHECKER = """
import asyncio, os, sys
from pathlib import Path
from collector.signatures import Signatures
from protos.takedown.v1 import takedown_pb2 as pb
s = Signatures(Path(sys.argv[1]), workers=1)
async def main():
    await s.check(bytes(32), "a", "n", pb.ResultBatch())
    print(" ".join(str(p) for p in s._pool._processes), flush=True)  # type: ignore[union-attr]
    await asyncio.Event().wait()  # until the test kills it
asyncio.run(main())
"""


async def test_signature_workers_die_with_a_killed_collector(tmp_path: Path) -> None:
    """SIGKILL of the collector leaves no signature-checking process behind."""
    import os
    import signal
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHECKER, str(tmp_path / "none.db"), stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    workers = [int(p) for p in line.split()]
    assert workers, "no worker process was started"
    process.send_signal(signal.SIGKILL)
    await process.wait()

    def gone() -> bool:
        for pid in workers:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return False
        return True

    await eventually(gone, 10, "the worker processes to exit")
