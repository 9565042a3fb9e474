"""The one tokenizer behind Max boxes and Pd records (export/atoms.py)."""

from __future__ import annotations

import pytest

from divergent.export.atoms import MAX_ATOMS, PD_ATOMS, AtomSyntax
from divergent.export.maxpat import tokenize


def test_max_atoms_group_quotes_and_drop_escapes() -> None:
    assert MAX_ATOMS.split('midiout "divergent in"') == ["midiout", "divergent in"]
    assert MAX_ATOMS.split('route "" x') == ["route", "", "x"]
    assert MAX_ATOMS.split(r"prepend a\ b, c") == ["prepend", "a b,", "c"]
    assert tokenize('  udpsend  127.0.0.1 "9000" ') == ["udpsend", "127.0.0.1", "9000"]


def test_pd_atoms_split_commas_and_keep_escaped_separators() -> None:
    assert PD_ATOMS.split(r"#X msg 10 20 1 \, 2, 3 \; a\ b \$1") == [
        "#X",
        "msg",
        "10",
        "20",
        "1",
        "\\,",
        "2",
        ",",
        "3",
        "\\;",
        "a b",
        "$1",
    ]
    assert PD_ATOMS.split('a "b c"') == ["a", '"b', 'c"']  # Pd has no quoting


def test_atom_syntax_refuses_whitespace_or_backslash_to_keep() -> None:
    with pytest.raises(ValueError, match="keep_escaped"):
        AtomSyntax(keep_escaped=" ")
    with pytest.raises(ValueError, match="keep_escaped"):
        AtomSyntax(keep_escaped="\\")
