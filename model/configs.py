"""One rule for the validated config dataclasses: a JSON-ready dict out, and back in
only with known keys (an unknown key is a typo or a file from another version, never
silently dropped). No torch here."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, ClassVar, Self

__all__ = ["StrictConfig"]


class StrictConfig:
    """Mixin for frozen dataclasses: ``to_dict`` / ``from_dict`` with unknown keys refused."""

    #: how errors name this config ("divergence options", "critic options", …)
    config_name: ClassVar[str] = "options"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.config_name}: {sorted(unknown)}")
        return cls(**d)
