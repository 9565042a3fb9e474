"""divergent: live human-AI music co-creation.

One installed import name over the design card's folders: ``divergent.server``,
``divergent.model``, ``divergent.bridges`` and ``divergent.export`` are the repository's
``server/``, ``model/``, ``bridges/`` and ``export/`` (mapped in ``pyproject.toml``).
This package holds only what sits above them all: the command line.
"""
