"""The app's side of the browser view: opening it (a port in use is a warning, not a
failed start) and publishing events to it, O(1) on the loop.

A mixin of :class:`~divergent.server.app.Server`, as :class:`Conductor` is.
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from divergent.server.answers import AnswerJob
from divergent.server.config import ServeConfig, allow_list
from divergent.server.control import Control
from divergent.server.handlers import VERSION
from divergent.server.web import WebView

__all__ = ["WebDesk"]

log = logging.getLogger("divergent.server")


class WebDesk(ABC):
    """The web view's wiring; the app supplies the state below."""

    config: ServeConfig
    sessions: Path
    web: WebView | None
    web_error: str
    _stack: contextlib.AsyncExitStack

    @property
    @abstractmethod
    def controls(self) -> dict[str, Control]:
        """The declared controls."""

    @property
    @abstractmethod
    def grid(self) -> Any:
        """The leading clock, read now."""

    @abstractmethod
    def _control(self, address: str, args: list[Any]) -> None:
        """The one dispatch OSC and MQTT use."""

    @abstractmethod
    def status_dict(self) -> dict[str, Any]:
        """The status."""

    async def _open_web(self) -> None:
        cfg = self.config
        if not cfg.web:
            return
        view = WebView(
            host=cfg.web_host,
            port=cfg.web_port,
            sessions=self.sessions,
            controls=self.controls,
            control=self._control,  # the one dispatch OSC and MQTT use
            status=self.status_dict,
            grid=lambda: self.grid,
            version=VERSION,
            allow=allow_list(cfg.osc_allow),  # one allow-list for every door
        )
        try:
            self.web = await self._stack.enter_async_context(view)
        except OSError as e:
            # the music does not need the page: a port in use is a warning, not a failed start
            self.web_error = f"{cfg.web_host}:{cfg.web_port}: {e.strerror or e}"
            log.warning("no browser view (%s)", self.web_error)
            return
        self._stack.callback(setattr, self, "web", None)

    def _publish(self, kind: str, t: float, *data: Any) -> None:
        """An event for the browser view (O(1); see WebView.publish)."""
        if self.web is not None:
            self.web.publish(kind, t, *data)

    def _web_notes(self, job: AnswerJob, notes: list[Any], placed: bool) -> None:
        if self.web is None:
            return
        if placed:
            self.web.publish("placed", time.monotonic(), job.answer_id, notes)
        else:
            req = job.request
            self.web.publish(
                "pending", time.monotonic(), job.answer_id, req.origin, notes, req.velocity
            )
