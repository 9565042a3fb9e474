"""One tokenizer for the patch formats' box text: Max's and Pure Data's atoms.

Both formats write a box as whitespace-separated atoms with backslash escapes; they
differ in three details, which :class:`AtomSyntax` names: Max groups ``"double
quoted"`` runs into one atom, Pd makes a bare comma an atom of its own (message
separators), and Pd keeps an escaped ``,`` or ``;`` escaped so it stays distinguishable
from the bare one. ``maxpat.tokenize`` reads Max boxes with :data:`MAX_ATOMS`; the
tests' Pd reader reads records with :data:`PD_ATOMS`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_ATOMS", "PD_ATOMS", "AtomSyntax"]


@dataclass(frozen=True)
class AtomSyntax:
    """How one format splits text into atoms (see the module docstring)."""

    #: a ``"double quoted"`` run is (part of) one atom, quotes removed
    quotes: bool = False
    #: an unescaped comma ends the atom before it and is an atom ``","`` itself
    commas: bool = False
    #: escaped characters kept with their backslash (every other escape drops it)
    keep_escaped: str = ""

    def __post_init__(self) -> None:
        if any(c.isspace() or c == "\\" for c in self.keep_escaped):
            raise ValueError(f"keep_escaped must be punctuation, got {self.keep_escaped!r}")

    def split(self, text: str) -> list[str]:
        """The atoms of ``text``, escapes undone (save those in ``keep_escaped``)."""
        atoms: list[str] = []
        cur: list[str] = []
        in_quote = False
        started = False  # an atom is open (it may be empty: "" in Max)

        def end_atom() -> None:
            nonlocal cur, started
            if started:
                atoms.append("".join(cur))
                cur, started = [], False

        i = 0
        while i < len(text):
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                nxt = text[i + 1]
                cur.append("\\" + nxt if nxt in self.keep_escaped else nxt)
                started = True
                i += 2
                continue
            if self.quotes and c == '"':
                in_quote = not in_quote
                started = True
            elif c.isspace() and not in_quote:
                end_atom()
            elif self.commas and c == "," and not in_quote:
                end_atom()
                atoms.append(",")
            else:
                cur.append(c)
                started = True
            i += 1
        end_atom()
        return atoms


#: Max's box text (``midiout "divergent in"`` -> ``["midiout", "divergent in"]``)
MAX_ATOMS = AtomSyntax(quotes=True)
#: Pd's records (``msg 1 \, 2, 3`` -> ``["msg", "1", "\\,", "2", ",", "3"]``)
PD_ATOMS = AtomSyntax(commas=True, keep_escaped=",;")
