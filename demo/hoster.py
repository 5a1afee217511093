"""A small sample "hosting provider" on loopback, for the demo and the tests.

It serves pages whose fate is scripted: each page can later be removed in one
of the ways real hosters remove content (404, 410, a replaced page, a
redirect away, connection refused is covered by stopping a site), answer 503
for a while, or be blocked for some client addresses (geo-blocking). The
moment each page changes is recorded as the ground truth the measurement is
checked against.

Every served body carries `marker`, so a test can prove that no file the
agent or collector wrote contains any body.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import web


class Fate(enum.Enum):
    ONLINE = "online"
    GONE_404 = "404"
    GONE_410 = "410"
    REPLACED = "replaced"
    REDIRECT = "redirect"
    UNAVAILABLE_503 = "503"
    DYNAMIC = "dynamic"  # online, but the body changes on every load
    CHALLENGE = "challenge"  # a bot-challenge page in front of the content


@dataclass
class Page:
    path: str
    fate: Fate = Fate.ONLINE
    blocked_for: frozenset[str] = frozenset()
    changed_at: float | None = None
    history: list[tuple[float, Fate]] = field(default_factory=list)


class Hoster:
    """An aiohttp app whose pages are removed on command; run it with `start(addresses)`."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.marker = f"TAKEDOWN-TEST-MARKER-{uuid.uuid4().hex}"
        self.pages: dict[str, Page] = {}
        self.requests: list[tuple[str, str]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    def add(self, path: str, blocked_for: Iterable[str] = ()) -> None:
        self.pages[path] = Page(path, blocked_for=frozenset(blocked_for))

    def set_fate(self, path: str, fate: Fate) -> float:
        """Change a page now; return the time of the change (the truth)."""
        page = self.pages[path]
        now = self.clock()
        page.fate = fate
        page.changed_at = now
        page.history.append((now, fate))
        return now

    def body(self, path: str) -> bytes:
        return f"<html><body>reported content at {path} {self.marker}</body></html>".encode()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.remote or "", request.path))
        page = self.pages.get(request.path)
        if page is None:
            if request.path == "/parked":
                return web.Response(text=f"This domain is parked. {self.marker}")
            raise web.HTTPNotFound()
        if request.remote in page.blocked_for:
            raise web.HTTPUnavailableForLegalReasons(link=None, text="not in your country")
        if page.fate is Fate.ONLINE:
            return web.Response(body=self.body(page.path), content_type="text/html")
        if page.fate is Fate.GONE_404:
            raise web.HTTPNotFound()
        if page.fate is Fate.GONE_410:
            raise web.HTTPGone()
        if page.fate is Fate.REPLACED:
            return web.Response(text=f"Account suspended. {self.marker}", content_type="text/html")
        if page.fate is Fate.REDIRECT:
            raise web.HTTPFound("/parked")
        if page.fate is Fate.DYNAMIC:
            nonce = uuid.uuid4().hex
            body = self.body(page.path) + nonce.encode()
            return web.Response(body=body, content_type="text/html")
        if page.fate is Fate.CHALLENGE:
            raise web.HTTPForbidden(text="Just a moment...", headers={"cf-mitigated": "challenge"})
        raise web.HTTPServiceUnavailable()

    async def start(self, addresses: Iterable[str], port: int = 0) -> int:
        """Serve on every address, all on one port (chosen by the first bind if 0)."""
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        for address in addresses:
            site = web.TCPSite(self._runner, address, port or self.port)
            await site.start()
            if not self.port:
                server = site._server
                assert server is not None and hasattr(server, "sockets")
                self.port = server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
