"""Tests for collector.attribution_sources: ipasn files, AS names, MaxMind ASN dbs, layering."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import random
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from agent.main import Agent, AgentConfig
from agent.probe import ProbeConfig
from collector.attribution import UNATTRIBUTED, Attribution, AttributionFileError, PrefixTable
from collector.attribution_sources import (
    LayeredAttributor,
    MmdbAsn,
    build_attributor,
    load_as_names,
    load_ipasn,
    parse_asn_list,
)
from collector.reports_file import ReportIn
from collector.schedule import Planner
from collector.server import Collector, CollectorConfig
from collector.store.reads import connect_readonly, url_statuses
from demo.hoster import Hoster
from tests.conftest import HOST_A, HOST_B, eventually

IPASN = """\
; IP-ASN32-DAT file
; Original source:\trib.20240101.0000.bz2
; Prefixes-v4:\t3
;
1.0.0.0/24\t13335
1.1.1.0/24\t13335

8.8.8.0/24\t15169
2606:4700::/32\t13335
2001:db8::/32\t64500
"""


def _ipasn(tmp_path: Path, text: str = IPASN, name: str = "ipasn.dat") -> Path:
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _csv(tmp_path: Path, text: str) -> PrefixTable:
    path = tmp_path / "overrides.csv"
    path.write_text(text, encoding="utf-8")
    return PrefixTable.from_csv(path)


def _mmdb(tmp_path: Path) -> Path:
    writer = MMDBWriter(ip_version=6, database_type="GeoLite2-ASN", ipv4_compatible=True)
    cloudflare = {"autonomous_system_number": 13335, "autonomous_system_organization": "CF Inc"}
    writer.insert_network(IPSet(["1.0.0.0/24", "2606:4700::/32"]), cloudflare)
    writer.insert_network(
        IPSet(["192.0.2.0/24", "2001:db8:1::/48"]),
        {"autonomous_system_number": 64501, "autonomous_system_organization": "Example Hosting"},
    )
    writer.insert_network(IPSet(["198.51.100.0/24"]), {"autonomous_system_number": 64502})
    writer.insert_network(IPSet(["203.0.113.0/24"]), {"note": "no asn here"})
    path = tmp_path / "asn.mmdb"
    writer.to_db_file(str(path))
    return path


class TestLoadIpasn:
    def test_v4_and_v6(self, tmp_path: Path) -> None:
        """IPv4 and IPv6 prefixes map to their AS; comments and blank lines are skipped."""
        table = load_ipasn(_ipasn(tmp_path))
        assert len(table) == 5
        assert table.lookup("1.1.1.1").asn == 13335
        assert table.lookup("8.8.8.8").asn == 15169
        assert table.lookup("2606:4700::1111").asn == 13335
        assert table.lookup("2001:db8::1").asn == 64500
        assert table.lookup("9.9.9.9") is UNATTRIBUTED

    def test_gzip(self, tmp_path: Path) -> None:
        """A .gz file is read the same as the plain one."""
        table = load_ipasn(_ipasn(tmp_path, name="ipasn.dat.gz"))
        assert table.lookup("8.8.8.8").asn == 15169
        assert table.lookup("2001:db8::1").asn == 64500

    def test_names_and_fallback(self, tmp_path: Path) -> None:
        """Named ASes get their name and trailing country; others are called AS<n>."""
        table = load_ipasn(_ipasn(tmp_path), names={13335: "CLOUDFLARENET, US"})
        hit = table.lookup("1.0.0.1")
        assert (hit.provider, hit.country) == ("CLOUDFLARENET", "US")
        assert table.lookup("8.8.8.8").provider == "AS15169"

    def test_attribution_shared_per_asn(self, tmp_path: Path) -> None:
        """All prefixes of one AS share a single Attribution object."""
        table = load_ipasn(_ipasn(tmp_path))
        assert table.lookup("1.0.0.1") is table.lookup("1.1.1.1") is table.lookup("2606:4700::1")

    @pytest.mark.parametrize(
        ("line", "reason"),
        [
            ("1.2.3.0/24", "expected PREFIX ASN"),
            ("1.2.3.0/33\t64500", "bad prefix"),
            ("1.2.3.0/24\tAS-SET", "not an AS number"),
            ("1.2.3.0/24\t4294967296", "not an AS number"),
            ("1.0.0.0/24\t64999", "conflicting"),
        ],
    )
    def test_bad_line(self, tmp_path: Path, line: str, reason: str) -> None:
        """A bad line raises AttributionFileError naming the file and line."""
        path = _ipasn(tmp_path, IPASN + line + "\n")
        with pytest.raises(AttributionFileError, match=f"^ipasn.dat:11: .*{reason}") as info:
            load_ipasn(path)
        assert info.value.line == 11


class TestLoadAsNames:
    def test_pyasn_json(self, tmp_path: Path) -> None:
        """pyasn's asnames.json maps string ASNs to names."""
        path = tmp_path / "asnames.json"
        path.write_text('{"13335": "CLOUDFLARENET, US", "15169": "GOOGLE, US"}', encoding="utf-8")
        assert load_as_names(path) == {13335: "CLOUDFLARENET, US", 15169: "GOOGLE, US"}

    def test_csv(self, tmp_path: Path) -> None:
        """A CSV asn,name with header, comments and AS prefixes is read."""
        path = tmp_path / "names.csv"
        path.write_text("asn,name\n# ours\nAS64500,Example Net\n\n15169,GOOGLE\n", encoding="utf-8")
        assert load_as_names(path) == {64500: "Example Net", 15169: "GOOGLE"}

    def test_bad_csv_line(self, tmp_path: Path) -> None:
        """A CSV row with a bad ASN names file and line."""
        path = tmp_path / "names.csv"
        path.write_text("asn,name\n1,a\nx1,b\n", encoding="utf-8")
        with pytest.raises(AttributionFileError, match=re.escape("names.csv:3: asn 'x1'")):
            load_as_names(path)

    def test_bad_json(self, tmp_path: Path) -> None:
        """Malformed JSON and non-numeric keys are AttributionFileErrors."""
        path = tmp_path / "asnames.json"
        path.write_text('{\n"13335": ', encoding="utf-8")
        with pytest.raises(AttributionFileError, match=r"^asnames.json:2: bad JSON"):
            load_as_names(path)
        path.write_text('{"cloudflare": "x"}', encoding="utf-8")
        with pytest.raises(AttributionFileError, match="'cloudflare'"):
            load_as_names(path)


class TestMmdbAsn:
    def test_lookups(self, tmp_path: Path) -> None:
        """v4, v6, mapped and scoped addresses find their AS record; others give None."""
        with MmdbAsn(_mmdb(tmp_path)) as db:
            assert db.lookup("1.0.0.1") == Attribution("CF Inc", 13335, None, False, None)
            assert db.lookup("::ffff:1.0.0.1") == db.lookup("1.0.0.1")
            assert db.lookup("2606:4700::1%eth0") == db.lookup("1.0.0.1")
            assert db.lookup("2001:db8:1::9") == Attribution(
                "Example Hosting", 64501, None, False, None
            )
            assert db.lookup("198.51.100.1") == Attribution("AS64502", 64502, None, False, None)
            for missing in ("203.0.113.1", "8.8.8.8", "2001:db8:2::1", "", "nonsense", "1.2.3"):
                assert db.lookup(missing) is None

    def test_closed_reader(self, tmp_path: Path) -> None:
        """After close a lookup gives None rather than raising."""
        db = MmdbAsn(_mmdb(tmp_path))
        db.close()
        assert db.lookup("1.0.0.1") is None

    def test_not_a_database(self, tmp_path: Path) -> None:
        """A file that is not a MaxMind DB raises AttributionFileError naming it."""
        path = tmp_path / "bogus.mmdb"
        path.write_bytes(b"not a database" * 10)
        with pytest.raises(AttributionFileError, match=r"^bogus.mmdb:0: not a MaxMind DB"):
            MmdbAsn(path)


class TestLayeredAttributor:
    def test_override_beats_mmdb_beats_ipasn(self, tmp_path: Path) -> None:
        """The CSV override wins, then the MaxMind db, then the ipasn table."""
        overrides = _csv(tmp_path, "prefix,asn,provider\n1.0.0.128/25,64999,Reseller\n")
        with MmdbAsn(_mmdb(tmp_path)) as db:
            layered = LayeredAttributor([overrides, db, load_ipasn(_ipasn(tmp_path))])
            assert layered.lookup("1.0.0.200").provider == "Reseller"
            assert layered.lookup("1.0.0.1").provider == "CF Inc"
            assert layered.lookup("8.8.8.8").provider == "AS15169"
            assert layered.lookup("2001:db8::1").asn == 64500
            assert layered.lookup("9.9.9.9") is UNATTRIBUTED

    def test_cdn_by_asn_list(self, tmp_path: Path) -> None:
        """Answers from an AS in cdn_asns are flagged cdn, others are not."""
        layered = LayeredAttributor([load_ipasn(_ipasn(tmp_path))], cdn_asns=frozenset({13335}))
        assert layered.lookup("1.1.1.1").cdn is True
        assert layered.lookup("2606:4700::1").cdn is True
        assert layered.lookup("8.8.8.8").cdn is False

    def test_cdn_by_csv(self, tmp_path: Path) -> None:
        """A CSV row with cdn=true stays a CDN answer without any ASN list."""
        overrides = _csv(tmp_path, "prefix,asn,provider,cdn\n192.0.2.0/24,64777,EdgeCo,true\n")
        layered = LayeredAttributor([overrides, load_ipasn(_ipasn(tmp_path))])
        assert layered.lookup("192.0.2.1").cdn is True
        assert layered.lookup("1.1.1.1").cdn is False

    def test_failing_source_is_skipped(self) -> None:
        """A source that raises is skipped so lookups never raise."""

        class Broken:
            def lookup(self, ip: str) -> Attribution | None:
                raise RuntimeError("boom")

        fallback = PrefixTable([(ipaddress.ip_network("0.0.0.0/0"), _attr("any", 1))])
        assert LayeredAttributor([Broken(), fallback]).lookup("1.2.3.4").provider == "any"

    def test_close_closes_mmdb(self, tmp_path: Path) -> None:
        """close() closes the MaxMind reader and leaves tables alone."""
        db = MmdbAsn(_mmdb(tmp_path))
        layered = LayeredAttributor([PrefixTable([]), db])
        layered.close()
        assert db.lookup("1.0.0.1") is None


class TestBuildAttributor:
    def test_all_sources(self, tmp_path: Path) -> None:
        """Configured files are layered overrides, mmdb, ipasn, with names and CDN ASNs."""
        (tmp_path / "o.csv").write_text("prefix,asn,provider\n8.8.8.0/25,1,Mine\n", "utf-8")
        (tmp_path / "n.csv").write_text("15169,GOOGLE\n", "utf-8")
        layered = build_attributor(
            prefixes=tmp_path / "o.csv",
            mmdb=_mmdb(tmp_path),
            ipasn=_ipasn(tmp_path),
            as_names=tmp_path / "n.csv",
            cdn_asns=parse_asn_list("AS13335, 1"),
        )
        assert (layered.lookup("8.8.8.8").provider, layered.lookup("8.8.8.8").cdn) == ("Mine", True)
        assert layered.lookup("8.8.8.200").provider == "GOOGLE"
        assert layered.lookup("1.0.0.1").provider == "CF Inc"
        assert layered.lookup("1.0.0.1").cdn is True
        layered.close()

    def test_nothing_configured(self) -> None:
        """With no sources every address is unattributed."""
        assert build_attributor().lookup("1.1.1.1") is UNATTRIBUTED

    def test_bad_asn_list(self) -> None:
        """A non-ASN in the CDN list is a ValueError."""
        with pytest.raises(ValueError, match="not a list of AS numbers"):
            parse_asn_list("13335,cloudflare")


def _attr(provider: str, asn: int) -> Attribution:
    return Attribution(provider=provider, asn=asn, country=None, cdn=False, prefix=None)


_POOL = ["10.0.0.0/8", "10.0.0.0/12", "10.16.0.0/12", "10.0.0.0/16", "10.1.0.0/16", "10.1.2.0/24"]
_prefix_table = st.lists(st.tuples(st.sampled_from(_POOL), st.integers(1, 4)), max_size=5).map(
    lambda rows: PrefixTable(
        {ipaddress.ip_network(net): _attr(f"P{asn}", asn) for net, asn in rows}.items()
    )
)


class _Exact:
    """A fake source answering only exact addresses, None otherwise (like MmdbAsn)."""

    def __init__(self, answers: dict[str, int]) -> None:
        self.answers = answers

    def lookup(self, ip: str) -> Attribution | None:
        asn = self.answers.get(ip)
        return None if asn is None else _attr(f"E{asn}", asn)


_HOSTS = ["10.0.0.1", "10.1.2.3", "10.1.9.9", "10.17.0.1", "10.200.0.1", "192.0.2.1"]
_addresses = st.one_of(
    st.sampled_from(_HOSTS),
    st.integers(10 << 24, (11 << 24) - 1).map(lambda n: str(ipaddress.IPv4Address(n))),
)
_exact = st.dictionaries(st.sampled_from(_HOSTS), st.integers(1, 4), max_size=3).map(_Exact)
_sources = st.lists(st.one_of(_prefix_table, _exact), max_size=4)


class TestLayeredProperties:
    @given(sources=_sources, ip=_addresses, cdn=st.frozensets(st.integers(1, 4)))
    def test_first_hit_wins(
        self, sources: list[PrefixTable | _Exact], ip: str, cdn: frozenset[int]
    ) -> None:
        """The layered answer is the first source's hit, cdn-flagged by ASN, else UNATTRIBUTED."""
        hits = (source.lookup(ip) for source in sources)
        expected = next((h for h in hits if h is not None and h is not UNATTRIBUTED), UNATTRIBUTED)
        got = LayeredAttributor(sources, cdn_asns=cdn).lookup(ip)
        assert (got.provider, got.asn) == (expected.provider, expected.asn)
        assert got.cdn == (expected.asn in cdn)

    @given(ip=st.text(max_size=50))
    def test_never_raises(self, ip: str) -> None:
        """Any string gives an Attribution."""
        table = PrefixTable([(ipaddress.ip_network("::/0"), _attr("v6", 1))])
        assert isinstance(LayeredAttributor([table]).lookup(ip), Attribution)


@pytest.mark.integration
async def test_collector_attributes_from_ipasn_behind_csv_overrides(tmp_path: Path) -> None:
    """A real collector and agent: HOST_A by the ipasn file and its AS name, HOST_B by the CSV."""
    routes = _ipasn(tmp_path, "127.0.0.0/8\t64510\n")
    names = tmp_path / "names.csv"
    names.write_text("asn,name\n64510,Routed Hosting Ltd\n")
    overrides = tmp_path / "prefixes.csv"
    overrides.write_text(f"prefix,asn,provider\n{HOST_B}/32,64501,Hoster B\n")
    collector = Collector(
        CollectorConfig(
            db=tmp_path / "c.db",
            listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0",
            prefixes=overrides,
            ipasn=routes,
            as_names=names,
            planner=replace(Planner.fixed(0.5), deadlines=(3600.0,)),
        )
    )
    hoster = Hoster()
    await collector.start()
    await hoster.start([HOST_A, HOST_B])
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        hoster.add("/x")
        now = time.time()
        urls = [f"http://{h}:{hoster.port}/x" for h in (HOST_A, HOST_B)]
        reports = [ReportIn(url=u, notified_at=now, received_at=None, reference=u) for u in urls]
        planner = collector.config.planner
        await collector.writer.run(lambda s: s.submit_reports(reports, now, planner))
        agent = Agent(
            AgentConfig(
                collector=f"127.0.0.1:{collector.grpc_port}",
                name="a",
                network="n",
                probe=ProbeConfig(source_address="127.0.0.2"),
                allow_private=(ipaddress.ip_network("127.0.0.0/8"),),
                flush_interval=0.1,
                first_spread=0.1,
            ),
            rng=random.Random(1),
        )
        task = asyncio.create_task(agent.run(stop))

        def providers() -> dict[str, tuple[str, int | None]]:
            conn = connect_readonly(collector.config.db)
            try:
                return {s.url: (s.provider, s.asn) for s in url_statuses(conn)}
            finally:
                conn.close()

        want = {urls[0]: ("Routed Hosting Ltd", 64510), urls[1]: ("Hoster B", 64501)}
        await eventually(lambda: providers() == want, 20, "both URLs attributed")
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 15)
        await hoster.stop()
        await collector.stop(grace=1)
