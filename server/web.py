"""The live browser view: a page served by ``divergent serve`` itself (aiohttp).

What it serves (every asset from the package's ``static/`` folder; no CDN, a stage has no
internet):

- ``/``: the page — controls, status line, online light, the piano roll (performer and
  machine on the leading clock's grid, the next answer drawn as soon as it exists), the
  novelty of every answer over time, the takes;
- ``/ws``: one WebSocket per page. Server → page: JSON events (``hello`` first, then
  ``status``, ``clock``, ``performer``, ``answer_notes``, ``sounded``, ``cancel``,
  ``reply``, ``ack``, ``error``, ``dropped``). Page → server: ``{"type": "control",
  "address": "/divergent/...", "args": [...], "ref": n}``, applied through the *same*
  declarations and validation as OSC and MQTT (the app's control dispatch), answered
  with an ``ack``; anything malformed gets an ``error`` back;
- ``/api/takes``: the takes in the sessions folder (JSON); ``/takes/NAME.mid``: one take,
  only a plain ``.mid`` file directly inside that folder.

Timing: the note path never waits for the web. The app's hooks call :meth:`WebView.publish`,
which appends a tuple to a bounded deque and wakes one broadcaster task; that task (on the
loop, never inside answer placement or the sender thread) encodes each event once and
hands the text to every page's own bounded queue. A page that cannot keep up loses events
(counted, and told so), never slows the others or the music.

Access: 127.0.0.1 by default. There is no sender allow-list for OSC to share, so any other
address must be asked for explicitly (``--web-host``) and is logged as a warning. A page
from another origin may not open the WebSocket, and on a loopback address requests must
name a loopback host (no DNS rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from divergent.bridges.osc import allowed, parse_allow
from divergent.server.control import Control
from divergent.server.performance import BEATS_PER_BAR, Grid
from divergent.server.takefile import list_takes
from divergent.server.telemetry import REPLIES

__all__ = ["CLIENT_QUEUE", "STATIC_DIR", "WebView", "is_loopback"]

log = logging.getLogger("divergent.server")

#: The page and its assets, shipped in the package.
STATIC_DIR = Path(__file__).with_name("static")
#: Events waiting for one page; past this the page loses events (counted).
CLIENT_QUEUE = 512
#: Events published but not yet broadcast; past this the oldest go (counted).
_PENDING = 8192
#: Encoded events a page gets when it connects (the recent piano roll and readouts).
_HISTORY = 2000
#: Clock frames and status checks for the pages, seconds apart.
_TICK_S = 0.1
#: A page's message may not be longer (a control is a few dozen bytes).
_MAX_MESSAGE = 16 * 1024
_TAKE_NAME = re.compile(r"[^/\\\x00]+\.mid")
_REPLY_ARGS = {r.address: r.args for r in REPLIES}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) stays on this machine."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _reply_fields(address: str, args: Sequence[Any]) -> dict[str, Any]:
    """A reply's values by the names REPLIES declares (the repeating last one as a list)."""
    decl = _REPLY_ARGS.get(address, ())
    out: dict[str, Any] = {}
    for i, arg in enumerate(decl):
        if arg.repeat:
            out[arg.name] = list(args[i:])
            return out
        if i < len(args):
            out[arg.name] = args[i]
    return out


def _declaration(c: Control) -> dict[str, Any]:
    return {
        "address": c.address,
        "doc": c.doc,
        "args": [
            {
                "name": a.name,
                "type": a.type,
                "lo": a.lo,
                "hi": a.hi,
                "choices": list(a.choices) if a.choices else None,
                "optional": not a.required,
            }
            for a in c.args
        ],
    }


@dataclass(eq=False)
class _Page:
    """One connected page: its socket and its own bounded queue."""

    ws: web.WebSocketResponse
    queue: asyncio.Queue[str]
    dropped: int = 0
    told: int = 0  # the dropped count the page was last told


@dataclass
class WebStats:
    """What the web view counts (the loop owns it)."""

    published: int = 0
    dropped_pending: int = 0  # events lost before the broadcast (the broadcaster was behind)
    dropped_pages: int = 0  # events lost by slow pages, all pages together
    malformed: int = 0
    controls: int = 0
    pages: int = 0
    connections: int = 0
    refused: int = 0  # requests from senders outside the allow-list
    per_page_dropped: list[int] = field(default_factory=list)


class WebView:
    """The page, its WebSocket and its HTTP endpoints, entered as an async context.

    The app hands in what the view reads and calls, never itself: ``controls`` (the
    declared address space, for the page to lay its controls out by), ``control(address,
    args)`` (the app's one control dispatch, shared with OSC and MQTT), ``status()`` (the
    status fields), ``grid()`` (the leading clock read at one moment) and ``sessions``
    (the folder of takes). Every method runs on the event loop.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        sessions: Path,
        controls: Mapping[str, Control],
        control: Callable[[str, list[Any]], None],
        status: Callable[[], dict[str, Any]],
        grid: Callable[[], Grid],
        version: str,
        client_queue: int = CLIENT_QUEUE,
        allow: Sequence[str] = (),
    ) -> None:
        self._allow = parse_allow(allow)  # the same allow-list as OSC (ValueError if bad)
        self.host = host
        self.port = port
        self.sessions = sessions
        self.stats = WebStats()
        self._controls = controls
        self._control = control
        self._status = status
        self._grid = grid
        self._version = version
        self._client_queue = client_queue
        self._boot = uuid.uuid4().hex  # a page that reconnects to a new one says "restarted"
        self._pending: deque[tuple[str, float, tuple[Any, ...], _Page | None]] = deque(
            maxlen=_PENDING
        )
        self._history: deque[str] = deque(maxlen=_HISTORY)
        self._pages: set[_Page] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._loop_thread = threading.get_ident()
        # a control from a page being applied now: its errors go back to it as the ack
        self._serving: _Page | None = None
        self._captured: list[str] = []
        self._last_status: dict[str, Any] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> WebView:
        self._loop_thread = threading.get_ident()
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_get("/", self._index)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/api/takes", self._takes)
        app.router.add_get("/api/status", self._api_status)
        app.router.add_get("/takes/{name}", self._take_file)
        # aiohttp's static handler refuses paths outside the folder and symlinks
        app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
        # a page's open socket must not hold the server's exit up for long
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        if not is_loopback(self.host):
            log.warning(
                "the web view listens on %s:%d: anyone who reaches it can control divergent"
                + (" (limited by --osc-allow)" if self._allow else " (limit it with --osc-allow)"),
                self.host,
                self.port,
            )
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._broadcast()), loop.create_task(self._tick())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for page in list(self._pages):
            # "going away": the page says the server stopped and reconnects on its own
            with contextlib.suppress(Exception):
                await asyncio.wait_for(page.ws.close(code=1001, message=b"server stopping"), 1.0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        """The page's address, as the banner prints it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    # ------------------------------------------------------------------ publishing

    def publish(self, kind: str, t: float, *data: Any) -> None:
        """Hand one event to the pages: O(1), never waits (the app's hooks call it).

        ``kind`` is ``reply`` (address, args), ``performer`` (on, pitch, velocity),
        ``pending`` (answer id, origin beat, model notes, velocity), ``placed`` (answer
        id, placed notes), ``sounded`` (answer id or None, pitch, on) or ``cancel``
        (answer id, None for all); ``t`` is monotonic seconds.
        """
        if threading.get_ident() != self._loop_thread:
            return  # only the loop publishes; a stray thread must not touch the deque
        origin = None
        if kind == "reply" and data[0] == "/divergent/error" and self._serving is not None:
            # the page whose control this is gets the error in its ack, the others as is
            self._captured.append(str(data[1][0]) if data[1] else "")
            origin = self._serving
        if len(self._pending) == self._pending.maxlen:
            self.stats.dropped_pending += 1
        self._pending.append((kind, t, data, origin))
        self.stats.published += 1
        self._wake.set()

    async def _broadcast(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            grid = self._grid()
            while self._pending:
                kind, t, data, origin = self._pending.popleft()
                try:
                    event = self._encode(kind, t, data, grid)
                except Exception:
                    # one odd event must not end the view
                    log.exception("web view: cannot encode %s", kind)
                    continue
                if event is None:
                    continue
                text = json.dumps(event, separators=(",", ":"), allow_nan=False)
                if kind != "reply" or data[0] in ("/divergent/answer", "/divergent/error"):
                    self._history.append(text)
                self._fan_out(text, skip=origin)
            # let the pages' writers run between bursts
            await asyncio.sleep(0)

    def _fan_out(self, text: str, *, skip: _Page | None = None) -> None:
        for page in self._pages:
            if page is not skip:
                self._put(page, text)

    def _put(self, page: _Page, text: str) -> None:
        try:
            page.queue.put_nowait(text)
        except asyncio.QueueFull:
            page.dropped += 1
            self.stats.dropped_pages += 1

    def _encode(self, kind: str, t: float, data: tuple[Any, ...], grid: Grid) -> Any:
        if kind == "reply":
            address, args = data
            if address == "/divergent/status":
                return None  # the pages get the status from the tick, on change
            return {
                "type": "reply",
                "t": t,
                "address": address,
                "args": _reply_fields(address, args),
            }
        if kind == "performer":
            on, pitch, velocity = data
            return {
                "type": "performer",
                "t": t,
                "beat": grid.beat_at(t),
                "on": bool(on),
                "pitch": int(pitch),
                "velocity": int(velocity),
            }
        if kind == "pending":
            answer_id, origin, notes, velocity = data
            return {
                "type": "answer_notes",
                "t": t,
                "id": answer_id,
                "placed": False,
                "notes": [
                    [
                        origin + n.onset_beats,
                        origin + n.onset_beats + n.duration_beats,
                        int(n.pitch),
                        int(velocity),
                    ]
                    for n in notes
                ],
            }
        if kind == "placed":
            answer_id, notes = data
            return {
                "type": "answer_notes",
                "t": t,
                "id": answer_id,
                "placed": True,
                "notes": [[n.on, n.off, int(n.pitch), int(n.velocity)] for n in notes],
            }
        if kind == "sounded":
            answer_id, pitch, on = data
            return {
                "type": "sounded",
                "t": t,
                "beat": grid.beat_at(t),
                # the sender's tag is the answer's id; anything else (a passed-through
                # note-off) belongs to no answer
                "id": answer_id if isinstance(answer_id, int) else None,
                "pitch": int(pitch),
                "on": bool(on),
            }
        if kind == "cancel":
            return {"type": "cancel", "t": t, "id": data[0]}
        raise ValueError(f"unknown event {kind!r}")

    async def _tick(self) -> None:
        """The clock for the pages' grid and the status when it changes."""
        while True:
            now = time.monotonic()
            status = self._status()
            if status != self._last_status:
                self._last_status = status
                text = json.dumps({"type": "status", "t": now, "status": status})
                # the history keeps the knob's positions: the novelty plot draws them
                self._history.append(text)
                self._fan_out(text)
            if self._pages:
                self._fan_out(json.dumps(self._clock_frame(now)))
            await asyncio.sleep(_TICK_S)

    def _clock_frame(self, now: float) -> dict[str, Any]:
        grid = self._grid()
        return {
            "type": "clock",
            "t": now,
            "beat": grid.beat_at(now),
            "bpm": grid.bpm(),
            "beats_per_bar": BEATS_PER_BAR,
        }

    # ------------------------------------------------------------------ HTTP

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self._allow and not allowed(request.remote or "", self._allow):
            self.stats.refused += 1
            raise web.HTTPForbidden(text="not in the allow-list")
        if is_loopback(self.host):
            # a loopback view answers loopback names only: a page on another site cannot
            # rebind its own name to 127.0.0.1 and read or control this one
            host = urlsplit(f"//{request.host}").hostname or ""
            if not is_loopback(host):
                raise web.HTTPForbidden(text=f"host {request.host!r} refused")
        response: web.StreamResponse = await handler(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    async def _index(self, request: web.Request) -> web.StreamResponse:
        response = web.FileResponse(STATIC_DIR / "index.html")
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
        )
        return response

    async def _api_status(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"status": self._status(), "web": asdict(self.stats) | self._page_counts()}
        )

    def _page_counts(self) -> dict[str, Any]:
        return {"pages": len(self._pages), "per_page_dropped": [p.dropped for p in self._pages]}

    async def _takes(self, request: web.Request) -> web.StreamResponse:
        # reading every .mid takes a while on a long session: off the loop
        infos = await asyncio.to_thread(list_takes, self.sessions)
        takes = [
            {
                "name": i.name,
                "file": i.path.name,
                "url": f"/takes/{i.path.name}",
                "started": i.started,
                "duration_s": round(i.duration_s, 2),
                "performer_notes": i.performer_notes,
                "machine_notes": i.machine_notes,
                "answers": i.answers,
                "recovered": i.recovered,
                "error": i.error,
            }
            for i in reversed(infos)  # newest first
        ]
        return web.json_response({"sessions": str(self.sessions), "takes": takes})

    async def _take_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = await asyncio.to_thread(self._take_path, name)
        if path is None:
            raise web.HTTPNotFound(text="no such take")
        response = web.FileResponse(path)
        response.headers["Content-Disposition"] = f'attachment; filename="{path.name}"'
        response.content_type = "audio/midi"
        return response

    def _take_path(self, name: str) -> Path | None:
        """``name`` as a take file directly inside the sessions folder, or None."""
        if not _TAKE_NAME.fullmatch(name) or name.startswith(".") or Path(name).name != name:
            return None
        folder = self.sessions.resolve()
        path = (folder / name).resolve()
        # resolve() follows links: a link pointing out of the folder is refused here
        if path.parent != folder or not path.is_file():
            return None
        return path

    # ------------------------------------------------------------------ WebSocket

    def _origin_ok(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # not a browser (a script on this machine): the host check holds
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == request.host

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if not self._origin_ok(request):
            # any site open in the performer's browser could otherwise drive the server
            raise web.HTTPForbidden(text="a WebSocket from another origin is refused")
        ws = web.WebSocketResponse(heartbeat=10.0, max_msg_size=_MAX_MESSAGE, compress=False)
        await ws.prepare(request)
        page = _Page(ws=ws, queue=asyncio.Queue(self._client_queue))
        page.queue.put_nowait(self._hello())
        self._pages.add(page)
        self.stats.pages = len(self._pages)
        self.stats.connections += 1
        writer = asyncio.get_running_loop().create_task(self._write(page))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._receive(page, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    self._refuse(page, "binary messages are not understood: send JSON text")
                elif msg.type == WSMsgType.ERROR:
                    log.info("web view: a page's socket failed: %s", ws.exception())
        finally:
            self._pages.discard(page)
            self.stats.pages = len(self._pages)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        return ws

    def _hello(self) -> str:
        now = time.monotonic()
        head = json.dumps(
            {
                "type": "hello",
                "version": self._version,
                "boot": self._boot,
                "t": now,
                "controls": [_declaration(c) for c in self._controls.values()],
                "status": self._status(),
                "clock": self._clock_frame(now),
                "queue": self._client_queue,
            },
            separators=(",", ":"),
        )
        # the recent events, already encoded: joined, not decoded and encoded again
        return head[:-1] + ',"history":[' + ",".join(self._history) + "]}"

    async def _write(self, page: _Page) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not page.ws.closed:
                text = await page.queue.get()
                await page.ws.send_str(text)
                if page.dropped != page.told and page.queue.empty():
                    page.told = page.dropped
                    await page.ws.send_str(json.dumps({"type": "dropped", "count": page.dropped}))

    def _refuse(self, page: _Page, message: str, ref: Any = None) -> None:
        self.stats.malformed += 1
        self._put(page, json.dumps({"type": "error", "message": message, "ref": ref}))

    def _receive(self, page: _Page, text: str) -> None:
        """One message from a page: a control, applied as OSC and MQTT apply theirs."""
        try:
            msg = json.loads(text)
        except ValueError as e:
            self._refuse(page, f"not JSON ({e})")
            return
        if not isinstance(msg, dict):
            self._refuse(page, "a message is a JSON object with a type")
            return
        ref = msg.get("ref")
        if not isinstance(ref, int | str | None) or isinstance(ref, bool):
            ref = None
        kind = msg.get("type")
        if kind != "control":
            self._refuse(page, f"unknown message type {kind!r} (expected control)", ref)
            return
        address, args = msg.get("address"), msg.get("args", [])
        if not isinstance(address, str):
            self._refuse(page, "control: address must be a string like /divergent/divergence", ref)
            return
        if not isinstance(args, list):
            self._refuse(page, f"{address}: args must be a JSON array", ref)
            return
        self.stats.controls += 1
        self._serving, self._captured = page, []
        try:
            # the app's dispatch: the declarations' checks, clamps and refusals; its
            # errors also reach OSC and MQTT (and, through publish, the other pages)
            self._control(address, args)
        finally:
            self._serving = None
        errors, self._captured = self._captured, []
        ok = not any(e.endswith("(rejected)") or "internal error" in e for e in errors)
        ack = {"type": "ack", "ref": ref, "address": address, "ok": ok, "messages": errors}
        self._put(page, json.dumps(ack))
