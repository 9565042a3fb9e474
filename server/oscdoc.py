"""``python -m divergent.server.oscdoc``: print ``docs/osc.md`` from the server's own declarations.

The OSC (and MQTT) address space is declared next to its handlers in ``server.handlers``;
this renders it, and ``tests/server/test_oscdoc.py`` fails when the committed file drifts.
"""

from __future__ import annotations

import sys
from pathlib import Path

from divergent.server.app import REPLIES, Server
from divergent.server.control import controls_of, generate_osc_doc

__all__ = ["DOC_PATH", "render"]

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "osc.md"


def render() -> str:
    """The Markdown of ``docs/osc.md``."""
    return generate_osc_doc(controls_of(Server), REPLIES)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        DOC_PATH.write_text(render())
    else:
        sys.stdout.write(render())
