"""The browser view (server/web.py): its HTTP and WebSocket surface against a real server
in this process (a fake MIDI port, the bundled model, real sockets), then the page itself
in a real headless Chromium (Debian's, through its chromedriver) against a real
``divergent serve`` process with a JACK peer.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import mido
import pytest

from divergent.server.app import Server
from divergent.server.bench_live import run_peer_process
from divergent.server.livepeer import ServeProcess
from tests.conftest import require_tool
from tests.server.test_app import FakePort, serve_in_process, wait_until

ROOT = Path(__file__).resolve().parents[2]


def web_in_process(
    tmp_path: Path,
    body: Callable[[Server, FakePort, str], Awaitable[None]],
    **options: Any,
) -> Server:
    """A server with its browser view on a free port; ``body`` gets its base URL."""

    async def run(server: Server, port: FakePort) -> None:
        assert server.web is not None, server.web_error
        await body(server, port, server.web.url.rstrip("/"))

    return serve_in_process(tmp_path, run, web_port=0, **options)


async def receive_until(
    ws: aiohttp.ClientWebSocketResponse, pred: Callable[[dict[str, Any]], bool], timeout: float = 5
) -> dict[str, Any]:
    """The first JSON event that satisfies ``pred``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "timed out waiting for an event"
        msg = await ws.receive(timeout=left)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        event = json.loads(msg.data)
        if pred(event):
            return event


async def control(
    ws: aiohttp.ClientWebSocketResponse, address: str, *args: Any, ref: int = 1
) -> dict[str, Any]:
    await ws.send_json({"type": "control", "address": address, "args": list(args), "ref": ref})
    return await receive_until(ws, lambda e: e["type"] == "ack" and e["ref"] == ref)


# --------------------------------------------------------------------------- HTTP and WS


def test_page_and_assets_come_from_the_package(tmp_path: Path) -> None:
    async def body(server: Server, port: FakePort, url: str) -> None:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/") as r:
                assert r.status == 200
                page = await r.text()
            assert "/static/app.js" in page and "/static/style.css" in page
            assert "http" not in page.replace("http-equiv", ""), "no outside asset"
            for asset in ("app.js", "style.css", "icon.svg"):
                async with http.get(f"{url}/static/{asset}") as r:
                    assert r.status == 200, asset
                    assert "//cdn" not in await r.text()
            # the static folder is the only one served
            async with http.get(url + "/static/../web.py") as r:
                assert r.status in (403, 404)
            async with http.get(url + "/static/%2E%2E/web.py") as r:
                assert r.status in (403, 404)
            # a loopback view answers loopback names only (no DNS rebinding)
            async with http.get(url + "/", headers={"Host": "evil.example:80"}) as r:
                assert r.status == 403

    web_in_process(tmp_path, body)


def test_the_osc_allow_list_guards_the_page_too(tmp_path: Path) -> None:
    """One allow-list for every door: a sender OSC would ignore gets no page either."""

    async def refused(server: Server, port: FakePort, url: str) -> None:
        async with aiohttp.ClientSession() as http, http.get(url + "/") as r:
            assert r.status == 403
        assert server.web is not None and server.web.stats.refused == 1

    web_in_process(tmp_path / "a", refused, osc_allow="10.0.0.0/8")

    async def allowed(server: Server, port: FakePort, url: str) -> None:
        async with aiohttp.ClientSession() as http, http.get(url + "/") as r:
            assert r.status == 200

    web_in_process(tmp_path / "b", allowed, osc_allow="10.0.0.0/8, 127.0.0.1")


def test_the_banner_prints_the_address(tmp_path: Path) -> None:
    async def body(server: Server, port: FakePort, url: str) -> None:
        assert f"  web        {url}/" in server.banner().splitlines()

    web_in_process(tmp_path, body)
    off = serve_in_process(tmp_path / "off", _noop, web=False)
    assert off.web is None and "  web        off" in off.banner().splitlines()


async def _noop(server: Server, port: FakePort) -> None:
    pass


def test_a_port_in_use_leaves_the_music_running(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        server = serve_in_process(tmp_path, _noop, web_port=busy)
    assert server.web is None and str(busy) in server.web_error
    assert any(line.startswith("  web        none (") for line in server.banner().splitlines())


def test_controls_go_through_the_declarations(tmp_path: Path) -> None:
    async def body(server: Server, port: FakePort, url: str) -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "/ws") as ws:
            hello = await receive_until(ws, lambda e: True)
            assert hello["type"] == "hello"
            declared = {c["address"]: c for c in hello["controls"]}
            # the page lays its controls out by the same declarations OSC and MQTT use
            assert set(declared) == set(server.controls)
            div = declared["/divergent/divergence"]["args"][0]
            assert (div["lo"], div["hi"]) == (0.0, 1.0)
            assert declared["/divergent/mode"]["args"][0]["choices"] == ["call", "jam", "off"]

            ack = await control(ws, "/divergent/divergence", 0.42, ref=1)
            assert ack["ok"] and ack["messages"] == []
            assert server.divergence == pytest.approx(0.42)
            status = await receive_until(
                ws, lambda e: e["type"] == "status" and e["status"]["divergence"] == 0.42
            )
            assert status["status"]["divergence"] == pytest.approx(0.42)
            # clamped like OSC: applied, with the clamp message
            ack = await control(ws, "/divergent/divergence", 7, ref=2)
            assert ack["ok"] and "clamped to 1.0 (applied)" in ack["messages"][0]
            assert server.divergence == 1.0
            # refused like OSC, with the reason
            ack = await control(ws, "/divergent/mode", "solo", ref=3)
            assert not ack["ok"] and "must be one of call, jam, off" in ack["messages"][0]
            ack = await control(ws, "/divergent/divergance", 0.1, ref=4)
            assert not ack["ok"] and "did you mean /divergent/divergence?" in ack["messages"][0]
            ack = await control(ws, "/divergent/divergence", True, ref=5)  # JSON true
            assert not ack["ok"] and "(rejected)" in ack["messages"][0]
            ack = await control(ws, "/divergent/mode", "JAM", ref=6)
            assert ack["ok"] and server.mode == "jam"
            assert server.divergence == 1.0  # nothing refused was applied
            # a refusal counts where OSC's do
            assert server.stats.osc_errors >= 3

    web_in_process(tmp_path, body)


def test_a_malformed_message_gets_an_error_never_a_crash(tmp_path: Path) -> None:
    bad: list[Any] = [
        "not json {",
        "[1, 2]",
        json.dumps({"type": "nope"}),
        json.dumps({"address": "/divergent/stop"}),
        json.dumps({"type": "control", "address": 5}),
        json.dumps({"type": "control", "address": "/divergent/bars", "args": "4"}),
        json.dumps({"type": "control", "address": "/divergent/bars", "args": [[4]]}),
        json.dumps({"type": "control", "address": "/divergent/bars", "args": [{"a": 1}]}),
        json.dumps({"type": "control", "address": "/divergent/bars", "args": [1e400]}),
        "\x00\xff",
        b"\x00binary",
    ]

    async def body(server: Server, port: FakePort, url: str) -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "/ws") as ws:
            await receive_until(ws, lambda e: e["type"] == "hello")
            for i, message in enumerate(bad):
                if isinstance(message, bytes):
                    await ws.send_bytes(message)
                else:
                    await ws.send_str(message)
                reply = await receive_until(ws, lambda e: e["type"] in ("error", "ack"))
                if reply["type"] == "ack":  # well-formed JSON, refused by the declaration
                    assert not reply["ok"] and "(rejected)" in reply["messages"][0], message
                else:
                    assert reply["message"], message
                assert i < len(bad)
            # still serving this page and others
            assert (await control(ws, "/divergent/bars", 2, ref=9))["ok"]
            assert server.bars == 2
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "/ws") as ws:
            await receive_until(ws, lambda e: e["type"] == "hello")
            # too long: the socket closes (1009), the server goes on
            await ws.send_str("x" * 100_000)
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "/ws") as ws:
            await receive_until(ws, lambda e: e["type"] == "hello")
            assert (await control(ws, "/divergent/bars", 3, ref=1))["ok"]
        assert server.web is not None and server.web.stats.malformed >= 5

    web_in_process(tmp_path, body)


def test_a_websocket_from_another_origin_is_refused(tmp_path: Path) -> None:
    async def body(server: Server, port: FakePort, url: str) -> None:
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(url + "/ws", origin="http://evil.example")
            assert info.value.status == 403
            # the page's own origin is fine
            host = url.split("//", 1)[1]
            async with http.ws_connect(url + "/ws", origin=f"http://{host}") as ws:
                assert (await receive_until(ws, lambda e: True))["type"] == "hello"

    web_in_process(tmp_path, body)


def test_takes_are_listed_and_downloaded_and_nothing_else(tmp_path: Path) -> None:
    secret = tmp_path / "secret.mid"
    secret.write_bytes(b"not yours")

    async def body(server: Server, port: FakePort, url: str) -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "/ws") as ws:
            await receive_until(ws, lambda e: e["type"] == "hello")
            port.play([60, 64, 67])
            await wait_until(lambda: server.perf.performer_notes == 3)
            assert (await control(ws, "/divergent/record/stop"))["ok"]
            sessions = server.sessions

            def written() -> bool:
                return any(sessions.glob("*.mid"))

            await wait_until(written)
            async with http.get(url + "/api/takes") as r:
                listing = await r.json()
            assert len(listing["takes"]) == 1
            take = listing["takes"][0]
            assert take["performer_notes"] == 3
            async with http.get(url + take["url"]) as r:
                assert r.status == 200
                assert "attachment" in r.headers["Content-Disposition"]
                data = await r.read()
            out = tmp_path / "downloaded.mid"
            out.write_bytes(data)
            mid = mido.MidiFile(out)
            assert sum(1 for t in mid.tracks for m in t if m.type == "note_on") >= 3
            # only .mid files directly inside the sessions folder
            (sessions / "escape.mid").symlink_to(secret)
            (sessions / "notes.txt").write_text("x")
            (sessions / ".hidden.mid").write_bytes(data)
            for path in (
                "/takes/..%2Fsecret.mid",
                "/takes/%2E%2E%2Fsecret.mid",
                "/takes/../secret.mid",
                "/takes/..%5Csecret.mid",
                f"/takes/{'%2F'.join(str(secret).split('/'))}",
                "/takes/escape.mid",
                "/takes/notes.txt",
                "/takes/.hidden.mid",
                "/takes/missing.mid",
                "/takes/%00.mid",
            ):
                async with http.get(url + path) as r:
                    assert r.status in (403, 404), path
                    assert b"not yours" not in await r.read(), path

    web_in_process(tmp_path, body)


def test_a_slow_page_loses_events_and_slows_nothing(tmp_path: Path) -> None:
    """A page that stops reading: its queue fills, its events are dropped and counted;
    a reading page gets everything and controls stay quick."""

    async def body(server: Server, port: FakePort, url: str) -> None:
        web = server.web
        assert web is not None
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(url + "/ws") as slow,
            http.ws_connect(url + "/ws") as fast,
        ):
            await receive_until(slow, lambda e: e["type"] == "hello")
            await receive_until(fast, lambda e: e["type"] == "hello")
            got: list[dict[str, Any]] = []

            async def read_fast() -> None:
                while True:
                    msg = await fast.receive()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        return
                    got.append(json.loads(msg.data))

            reader = asyncio.get_running_loop().create_task(read_fast())
            # ~40 MB of events in bursts a reading page keeps up with: far past the slow
            # page's socket buffers and queue
            blob = "x" * 4000
            lags: list[float] = []
            for _ in range(100):
                for _ in range(100):
                    web.publish("reply", time.monotonic(), "/divergent/error", (blob,))
                t = time.monotonic()
                await asyncio.sleep(0.02)
                lags.append(time.monotonic() - t - 0.02)
            web.publish("reply", time.monotonic(), "/divergent/error", ("the last",))
            await wait_until(
                lambda: any(e.get("args", {}).get("message") == "the last" for e in got), 20
            )
            assert web.stats.dropped_pages > 0
            dropped = [p.dropped for p in web._pages]
            assert max(dropped) > 0 and min(dropped) == 0, dropped  # only the slow one lost
            # a control from the reading page is still answered at once
            t = time.monotonic()
            await fast.send_json({"type": "control", "address": "/divergent/bars", "args": [5]})
            await wait_until(lambda: any(e["type"] == "ack" for e in got), 5)
            assert time.monotonic() - t < 1.0 and server.bars == 5
            assert max(lags) < 0.5, max(lags)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            async with http.get(url + "/api/status") as r:
                stats = (await r.json())["web"]
            assert stats["dropped_pages"] > 0 and stats["pages"] == 2

    web_in_process(tmp_path, body)


def test_the_answer_is_previewed_before_it_sounds_and_cancel_clears_it(
    tmp_path: Path,
) -> None:
    """The page gets an answer's notes as soon as they are generated, before the first
    one sounds; a stop cancels what is still to come."""

    async def body(server: Server, port: FakePort, url: str) -> None:
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "/ws") as ws:
            await receive_until(ws, lambda e: e["type"] == "hello")
            port.play([60, 62, 64, 65, 67])
            events: list[tuple[float, dict[str, Any]]] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                msg = await ws.receive(timeout=20)
                e = json.loads(msg.data)
                events.append((time.monotonic(), e))
                if e["type"] == "sounded" and e["on"] and e["id"] is not None:
                    break
            notes = [(t, e) for t, e in events if e["type"] == "answer_notes"]
            sounded = next(e for _, e in events if e["type"] == "sounded" and e["on"])
            first_preview = next(e for _, e in notes if e["id"] == sounded["id"])
            assert first_preview["notes"], first_preview
            placed = [e for _, e in notes if e["id"] == sounded["id"] and e["placed"]]
            assert placed, "the placed notes came before the first one sounded"
            on = min(n[0] for e in placed for n in e["notes"])
            assert sounded["beat"] == pytest.approx(on, abs=0.05), "filled where it was drawn"
            # a stop: what is still to come goes
            assert (await control(ws, "/divergent/stop", ref=7))["ok"]
            await receive_until(ws, lambda e: e["type"] == "cancel")

    web_in_process(tmp_path, body, mode="call", quantize="bar", bars=4, bpm=120)


# --------------------------------------------------------------------------- the browser


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    """Debian's chromium, headless, through Debian's chromedriver (Selenium)."""
    require_tool("chromium", "chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1050",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(arg)
    service = Service(executable_path=str(shutil.which("chromedriver")))
    driver = webdriver.Chrome(service=service, options=options)
    yield driver
    driver.quit()


def _page(driver: Any, expr: str) -> Any:
    return driver.execute_script(f"return {expr};")


def _wait_page(driver: Any, expr: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = _page(driver, expr)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"the page never showed {expr}; its log: {driver.get_log('browser')}")


def _status(sp: ServeProcess) -> list[Any]:
    t = time.monotonic()
    sp.osc.send("/divergent/status")
    got = sp.osc.wait_for("/divergent/status", after=t)
    assert got is not None, sp.log()[-3000:]
    return got[2]


def test_the_page_in_a_real_browser(tmp_path: Path, jack_server: Any, browser: Any) -> None:
    """Debian's headless Chromium loads the page, moves the divergence control (the server
    shows it), sees a JACK peer's phrase answered — the answer drawn before its first note
    reaches the peer, then its readout — downloads the take, and lives through a restart."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    name = f"dvweb{os.getpid() % 10000}"
    web_port = _free_tcp_port()
    serve_args = [
        "--midi-backend",
        "jack",
        "--mode",
        "call",
        "--quantize",
        "bar",
        "--bpm",
        "80",
        "--bars",
        "1",
        "--web-port",
        str(web_port),
    ]
    sp = ServeProcess(serve_args, workdir=tmp_path / "s0", name=name)
    sp.workdir.mkdir(parents=True)
    started = [sp.start()]
    try:
        url = f"http://127.0.0.1:{web_port}/"
        # the banner is printed once startup is over, a moment after OSC answers a ping
        deadline = time.monotonic() + 10
        while f"web        {url}" not in sp.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"web        {url}" in sp.log(), sp.log()[-2000:]
        browser.get(url)
        _wait_page(browser, "window.divergentView && window.divergentView.connected")
        assert "online" in browser.find_element(By.ID, "online").text

        # the divergence control, moved the way a performer would: a click on the slider
        slider = browser.find_element(By.ID, "divergence")
        width = slider.size["width"]
        ActionChains(browser).move_to_element_with_offset(
            slider, int(width * 0.2), 0
        ).click().perform()
        value = float(slider.get_attribute("value"))
        assert 0.55 < value < 0.85, value
        deadline = time.monotonic() + 5
        while abs(_status(sp)[3] - value) > 1e-6:
            assert time.monotonic() < deadline, (_status(sp), value)
            time.sleep(0.05)
        _wait_page(browser, f"window.divergentView.status.divergence === {value}")

        # a JACK peer plays a phrase; the page draws the answer before it sounds
        wall = time.time() - time.monotonic()  # this machine's monotonic clock, as wall time
        peer = run_peer_process(
            ["phrases", "--server", name, "--phrases", "1", "--answer-wait", "8"], timeout=60
        )
        ons = sorted(r[0] for r in peer["received"] if (int(r[1]) & 0xF0) == 0x90 and r[3] > 0)
        assert ons, (peer, sp.log()[-3000:])
        answer = sp.osc.wait_for("/divergent/answer", after=0, timeout=10)
        assert answer is not None, sp.log()[-3000:]
        answer_id = answer[2][0]
        assert answer[2][7] == pytest.approx(value, abs=1e-6)  # made at the page's knob
        drawn_ms = _wait_page(browser, f"window.divergentView.drawn[{answer_id}]")
        first_note_ms = (ons[0] + wall) * 1000
        assert drawn_ms < first_note_ms, (
            f"drawn {drawn_ms - first_note_ms:.0f} ms after its first note reached the peer"
        )
        readout_ms = _wait_page(browser, f"window.divergentView.readoutDrawn[{answer_id}]")
        assert readout_ms >= drawn_ms
        assert _page(
            browser, f"window.divergentView.answers.get({answer_id}).notes.some(n => n.filled)"
        )
        time.sleep(0.3)
        browser.save_screenshot(str(ROOT / "docs" / "web_view.png"))

        # the take: recorded since the start, written at the page's "stop recording"
        browser.find_element(By.ID, "record-stop").click()
        _wait_page(browser, "window.divergentView.status.recording === 0")
        link = _wait_page(browser, "document.querySelector('#takes a.take-link')?.href", timeout=20)
        with urllib.request.urlopen(link, timeout=10) as r:
            data = r.read()
        take = tmp_path / "take.mid"
        take.write_bytes(data)
        mid = mido.MidiFile(take)
        machine = next(t for t in mid.tracks if t.name == "machine")
        assert sum(1 for m in machine if m.type == "note_on" and m.velocity > 0) >= 1

        # a restart: the page says it lost the server, reconnects, and says so
        sp.stop()
        _wait_page(browser, "!window.divergentView.connected")
        assert "offline" in browser.find_element(By.ID, "online").text
        again = ServeProcess(serve_args, workdir=tmp_path / "s1", name=name + "b")
        again.workdir.mkdir(parents=True)
        started.append(again.start())
        _wait_page(browser, "window.divergentView.restarts === 1", timeout=20)
        assert "restarted" in browser.find_element(By.ID, "notice").text
        assert "online" in browser.find_element(By.ID, "online").text
    finally:
        for s in started:
            s.stop(signal.SIGKILL if s.proc and s.proc.poll() is None else signal.SIGTERM)
