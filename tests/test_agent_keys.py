"""The agent signs what it reports: its key in the hello, a valid signature on every batch.

A real grpc.aio server on 127.0.0.1 stands in for the collector: it records each hello and
batch, welcomes, assigns URLs served by a loopback hoster, and acknowledges every batch. The
signatures are checked with the collector's own evidence functions (docs/EVIDENCE.md §3).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.keys import KEY_FILE, PUBLIC_FILE, AgentKey
from agent.main import Agent, AgentConfig
from agent.probe import ProbeConfig
from collector.evidence.leaves import batch_signing_bytes, url_sha256
from collector.evidence.note import ed25519_verifies
from collector.evidence.wire import batch_tree
from demo.hoster import Hoster
from protos.takedown.v1 import takedown_pb2 as pb
from protos.takedown.v1 import takedown_pb2_grpc as pb_grpc
from tests.conftest import eventually

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
PATHS = ("/a", "/b")
AGENT = str(Path(sys.executable).parent / "takedown-agent")
# Port 1 is never reached: the key is read before the agent connects.
COMMON = ["--collector", f"{LOOPBACK}:1", "--network", "n", "--insecure"]
COMMON += ["--metrics-listen", "", "--log-level", "ERROR"]


@dataclass
class FakeCollector(pb_grpc.AgentLinkServicer):
    """Welcomes every agent, assigns `urls`, records hellos and batches, acks each batch."""

    urls: dict[int, str]
    hellos: list[pb.Hello] = field(default_factory=list)
    batches: list[pb.ResultBatch] = field(default_factory=list)

    async def Connect(
        self,
        request_iterator: AsyncIterator[pb.AgentMessage],
        context: grpc.aio.ServicerContext[pb.AgentMessage, pb.CollectorMessage],
    ) -> AsyncIterator[pb.CollectorMessage]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "hello":
            return
        self.hellos.append(first.hello)
        yield pb.CollectorMessage(welcome=pb.Welcome(agent_id=len(self.hellos)))
        targets = [pb.Target(url_id=i, url=u, interval_ms=300) for i, u in self.urls.items()]
        yield pb.CollectorMessage(assignment=pb.AssignmentUpdate(upsert=targets, in_sync=True))
        async for message in request_iterator:
            if message.WhichOneof("kind") == "batch":
                self.batches.append(message.batch)
                stored = len(message.batch.results)
                yield pb.CollectorMessage(
                    ack=pb.BatchAck(batch_id=message.batch.batch_id, stored=stored)
                )


@pytest.fixture
async def site() -> AsyncIterator[Hoster]:
    hoster = Hoster()
    await hoster.start([LOOPBACK])
    for path in PATHS:
        hoster.add(path)
    yield hoster
    await hoster.stop()


@pytest.fixture
async def collector(site: Hoster) -> AsyncIterator[tuple[FakeCollector, int]]:
    fake = FakeCollector({i: f"http://{LOOPBACK}:{site.port}{p}" for i, p in enumerate(PATHS, 1)})
    server = grpc.aio.server()
    pb_grpc.add_AgentLinkServicer_to_server(fake, server)
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    await server.start()
    yield fake, port
    await server.stop(None)


def config(port: int, **changes: Any) -> AgentConfig:
    return AgentConfig(
        collector=f"{LOOPBACK}:{port}",
        name="signer-1",
        network="nl-test",
        probe=ProbeConfig(total_timeout=5, connect_timeout=2, read_timeout=3),
        allow_private=(ipaddress.ip_network(f"{LOOPBACK}/32"),),
        flush_interval=0.1,
        first_spread=0.1,
        jitter=0.0,
        **changes,
    )


async def run_until(agent: Agent, done: Callable[[], bool], what: str) -> None:
    """Run `agent` until `done()` holds (within a deadline), then stop it gracefully."""
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await eventually(lambda: task.done() or done(), 20, what)
        assert not task.done(), "the agent ended early"
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def probed_both(fake: FakeCollector) -> Callable[[], bool]:
    return lambda: {r.url_id for b in fake.batches for r in b.results} >= set(fake.urls)


def assert_all_verify(fake: FakeCollector, hello: pb.Hello) -> int:
    """Every batch received verifies under `hello`'s key, over the tree of its results each
    with the hash of its assigned URL; returns how many results there were."""
    count = 0
    for batch in fake.batches:
        assert len(batch.batch_signature) == 64, batch.batch_id
        for result in batch.results:
            assert result.url_sha256 == url_sha256(fake.urls[result.url_id]), result.seq
        tree = batch_tree(hello.agent, hello.network, batch.results)
        message = batch_signing_bytes(hello.agent, hello.network, tree.size, tree.root)
        assert ed25519_verifies(hello.public_key, message, batch.batch_signature)
        for k in range(len(batch.results)):
            other = pb.ResultBatch()
            other.CopyFrom(batch)
            other.results[k].status ^= 1  # any other field value: the signature no longer fits
            changed = batch_tree(hello.agent, hello.network, other.results)
            assert not ed25519_verifies(
                hello.public_key,
                batch_signing_bytes(hello.agent, hello.network, changed.size, changed.root),
                batch.batch_signature,
            )
        count += len(batch.results)
    return count


class TestSigning:
    async def test_state_dir_key_is_in_hello_signs_every_result_and_survives_restart(
        self, tmp_path: Path, collector: tuple[FakeCollector, int]
    ) -> None:
        """The first start makes STATE_DIR/agent.key; the hello carries its public key; every
        batch has a signature over all its results that verifies under it; a restart on the same
        state dir keeps the same key."""
        fake, port = collector
        state = tmp_path / "state"
        agent = Agent(config(port, state_dir=state), rng=random.Random(1))
        await run_until(agent, probed_both(fake), "results for both URLs")
        stored = AgentKey.load(state / KEY_FILE)
        public = serialization.load_pem_public_key((state / PUBLIC_FILE).read_bytes())
        assert isinstance(public, Ed25519PublicKey)
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert raw == stored.public_key  # agent.pub, for agents add --public-key
        first = fake.hellos[0]
        assert (first.agent, first.network) == ("signer-1", "nl-test")
        assert first.public_key == stored.public_key and len(first.public_key) == 32
        assert assert_all_verify(fake, first) >= 2
        key_bytes = (state / KEY_FILE).read_bytes()

        fake.batches.clear()
        again = Agent(config(port, state_dir=state), rng=random.Random(2))
        await run_until(again, probed_both(fake), "results after the restart")
        assert len(fake.hellos) >= 2
        assert fake.hellos[-1].public_key == stored.public_key
        assert (state / KEY_FILE).read_bytes() == key_bytes
        assert assert_all_verify(fake, fake.hellos[-1]) >= 2

    async def test_key_file_signs_without_a_state_dir(
        self, tmp_path: Path, collector: tuple[FakeCollector, int]
    ) -> None:
        """--agent-key-file alone (no state dir) is the key the hello carries and results are
        signed with."""
        fake, port = collector
        key = AgentKey.load_or_create(tmp_path)  # a key made beforehand, kept elsewhere
        agent = Agent(config(port, key_file=tmp_path / KEY_FILE), rng=random.Random(3))
        await run_until(agent, probed_both(fake), "results for both URLs")
        assert fake.hellos[0].public_key == key.public_key
        assert assert_all_verify(fake, fake.hellos[0]) >= 2

    async def test_without_state_dir_or_key_file_results_are_unsigned(
        self, collector: tuple[FakeCollector, int], caplog: pytest.LogCaptureFixture
    ) -> None:
        """No state dir and no key file: an empty key in the hello, no signatures, and one info
        line saying so."""
        caplog.set_level(logging.INFO, logger="agent.main")
        fake, port = collector
        agent = Agent(config(port), rng=random.Random(4))
        await run_until(agent, probed_both(fake), "results for both URLs")
        assert fake.hellos[0].public_key == b""
        assert all(not b.batch_signature for b in fake.batches)
        assert all(not r.url_sha256 for b in fake.batches for r in b.results)
        said = [r for r in caplog.records if "results_unsigned" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.INFO


def agent_exit(*args: str) -> tuple[int, list[str]]:
    """Run takedown-agent to its end; its exit status and the lines it printed as errors."""
    done = subprocess.run(
        [AGENT, *COMMON, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("TAKEDOWN_")},
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stderr.splitlines()


class TestBadKeyFile:
    @pytest.mark.parametrize(
        ("content", "mode", "problem"),
        [
            (b"garbage\n", 0o600, "is not an unencrypted PEM private key"),
            (None, 0o600, "cannot read the agent key"),
            (b"garbage\n", 0o644, "is readable by others; chmod 600 it"),
        ],
    )
    def test_one_line_naming_the_file_and_the_problem(
        self, tmp_path: Path, content: bytes | None, mode: int, problem: str
    ) -> None:
        """A key file that cannot be read, is open to others, or is not a key ends the agent
        (exit 2) with one line naming the file and what is wrong, before it connects."""
        path = tmp_path / "agent.key"
        if content is not None:
            path.write_bytes(content)
            path.chmod(mode)
        status, lines = agent_exit("--agent-key-file", str(path))
        assert status == 2
        assert len(lines) == 1, lines
        assert lines[0].startswith("takedown-agent: ") and str(path) in lines[0], lines
        assert problem in lines[0], lines

    def test_garbage_key_in_the_state_dir(self, tmp_path: Path) -> None:
        """A state dir whose agent.key is not a key is refused the same way, not replaced."""
        (tmp_path / KEY_FILE).write_bytes(b"not a key")
        (tmp_path / KEY_FILE).chmod(0o600)
        status, lines = agent_exit("--state-dir", str(tmp_path))
        assert status == 2
        key = tmp_path / KEY_FILE
        assert lines == [f"takedown-agent: {key} is not an unencrypted PEM private key"]
        assert (tmp_path / KEY_FILE).read_bytes() == b"not a key"
        assert not (tmp_path / "spool.db").exists()
