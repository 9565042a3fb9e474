"""The divergent tokenizer: miditok REMI on one merged stream, validated on load.

Everything that turns music into token ids (and back) goes through here, so the
training data, the shipped model and the live server agree on one vocabulary.

Design choices (and why):
- REMI, all parts merged into one stream: one vocabulary for melodies and chords, and
  the model sees polyphony as several Pitch/Duration pairs after one Position.
- No velocity tokens: music21's corpus has constant velocities, so they would learn
  nothing; the live server takes velocity from the performer instead.
- No tempo tokens: the tempo comes from the prompt (or the live clock), not the model.
- Time signature tokens: the metre is part of the music the model continues.
- ``Concept_i`` special tokens are reserved at the start of the vocabulary so a later
  concept-learning step (Pivotal Parameters Tuning) can teach named concepts without
  changing the vocabulary size or the ONNX graph.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import symusic
    from miditok import REMI

__all__ = [
    "TokenizerError",
    "TokenizerSpec",
    "Vocab",
    "build_tokenizer",
    "import_miditok",
    "load_tokenizer",
    "merge_to_one_track",
]


class TokenizerError(ValueError):
    """A tokenizer config or a piece of music that the tokenizer cannot use."""


class _BlockTorch(importlib.abc.MetaPathFinder):
    """Make ``import torch`` fail while miditok's package ``__init__`` runs.

    ``import miditok`` imports ``miditok.pytorch_data`` (and so torch) whenever torch is
    installed: +1 s and +180 MB on the serving path. miditok guards that import with
    ``except ImportError``, so refusing torch for the duration is enough.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torch" or fullname.startswith("torch."):
            raise ImportError(f"{fullname} is not loaded on the serving path")
        return None


@contextmanager
def _torch_blocked() -> Iterator[None]:
    finder = _BlockTorch()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def import_miditok() -> ModuleType:
    """Import miditok without pulling in torch (unless torch is already loaded)."""
    if "miditok" in sys.modules:
        return sys.modules["miditok"]
    if "torch" in sys.modules:
        import miditok

        return miditok
    with _torch_blocked():
        import miditok
    return miditok


@dataclass(frozen=True)
class TokenizerSpec:
    """The parameters of the divergent tokenizer, validated, with a JSON round trip."""

    pitch_range: tuple[int, int] = (21, 109)
    #: Positions per beat for onsets; 12 covers sixteenths and eighth-note triplets.
    positions_per_beat: int = 12
    #: Durations: 12 per beat up to 4 beats, then 4 per beat up to 12 beats.
    beat_res: tuple[tuple[int, int, int], ...] = ((0, 4, 12), (4, 12, 4))
    time_signatures: tuple[tuple[int, tuple[int, ...]], ...] = (
        (2, (2, 3, 4)),
        (4, (1, 2, 3, 4, 5, 6, 7)),
        (8, (3, 5, 6, 7, 9, 12)),
    )
    n_concepts: int = 16
    special: tuple[str, ...] = ("PAD", "BOS", "EOS")
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lo, hi = self.pitch_range
        if not (0 <= lo < hi <= 128):
            raise TokenizerError(
                f"pitch_range must satisfy 0 <= lo < hi <= 128, got {self.pitch_range}"
            )
        if self.n_concepts < 0 or self.n_concepts > 256:
            raise TokenizerError(f"n_concepts must be in 0..256, got {self.n_concepts}")
        if tuple(self.special[:3]) != ("PAD", "BOS", "EOS"):
            raise TokenizerError("special tokens must start with PAD, BOS, EOS")
        if self.positions_per_beat not in {r for _, _, r in self.beat_res}:
            raise TokenizerError("positions_per_beat must be one of the beat_res resolutions")
        for a, b, r in self.beat_res:
            if not (0 <= a < b) or r <= 0:
                raise TokenizerError(f"bad beat_res entry {(a, b, r)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["time_signatures"] = [[den, list(nums)] for den, nums in self.time_signatures]
        d["beat_res"] = [list(x) for x in self.beat_res]
        d["pitch_range"] = list(self.pitch_range)
        d["special"] = list(self.special)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise TokenizerError(f"unknown tokenizer spec keys: {sorted(unknown)}")
        try:
            return cls(
                pitch_range=(int(d["pitch_range"][0]), int(d["pitch_range"][1])),
                positions_per_beat=int(d.get("positions_per_beat", 12)),
                beat_res=tuple((int(a), int(b), int(r)) for a, b, r in d["beat_res"]),
                time_signatures=tuple(
                    (int(den), tuple(int(n) for n in nums)) for den, nums in d["time_signatures"]
                ),
                n_concepts=int(d.get("n_concepts", 0)),
                special=tuple(str(s) for s in d.get("special", ("PAD", "BOS", "EOS"))),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise TokenizerError(f"malformed tokenizer spec: {e}") from e

    def special_tokens(self) -> list[str]:
        return list(self.special) + [f"Concept_{i}" for i in range(self.n_concepts)]

    def miditok_config(self) -> Any:
        miditok = import_miditok()
        return miditok.TokenizerConfig(
            pitch_range=self.pitch_range,
            beat_res={(a, b): r for a, b, r in self.beat_res},
            use_velocities=False,
            use_tempos=False,
            use_time_signatures=True,
            use_programs=False,
            use_chords=False,
            use_rests=False,
            special_tokens=self.special_tokens(),
            time_signature_range={den: list(nums) for den, nums in self.time_signatures},
            # stored as a JSON string: miditok's serializer rewrites nested keys named
            # like its own (beat_res) and would corrupt a nested dict
            divergent_spec=json.dumps(self.to_dict(), sort_keys=True),
        )


class Vocab:
    """Token ids grouped by type, as numpy arrays, for masks and fast lookups.

    Built once from a tokenizer; the runtime grammar and the sampler use it without
    touching miditok again.
    """

    def __init__(self, vocab: dict[str, int]) -> None:
        self.size = max(vocab.values()) + 1
        self.names: list[str] = [""] * self.size
        for name, i in vocab.items():
            self.names[i] = name
        self.pad = vocab["PAD_None"]
        self.bos = vocab["BOS_None"]
        self.eos = vocab["EOS_None"]
        self.bar = vocab["Bar_None"]

        def ids(prefix: str) -> np.ndarray:
            return np.array(
                sorted(i for n, i in vocab.items() if n.startswith(prefix + "_")), dtype=np.int64
            )

        self.pitch_ids = ids("Pitch")
        self.position_ids = ids("Position")
        self.duration_ids = ids("Duration")
        self.timesig_ids = ids("TimeSig")
        self.concept_ids = np.array(
            sorted(i for n, i in vocab.items() if n.startswith("Concept_")), dtype=np.int64
        )
        # value of each token within its type (pitch number, position index, ...)
        self.value = np.full(self.size, -1, dtype=np.int64)
        for i in self.pitch_ids:
            self.value[i] = int(self.names[i].split("_")[1])
        for i in self.position_ids:
            self.value[i] = int(self.names[i].split("_")[1])
        self.min_pitch = int(self.value[self.pitch_ids].min())
        self.max_pitch = int(self.value[self.pitch_ids].max())
        # Pitch ids are contiguous in miditok's REMI vocabulary; transposition on ids
        # relies on it, so check instead of assuming.
        if not np.array_equal(
            self.pitch_ids, np.arange(self.pitch_ids[0], self.pitch_ids[0] + len(self.pitch_ids))
        ):
            raise TokenizerError("Pitch token ids are not contiguous")
        # durations in beats (miditok's "beats.ticks.resolution")
        self.duration_beats = np.zeros(self.size, dtype=np.float64)
        for i in self.duration_ids:
            b, t, r = (int(x) for x in self.names[i].split("_")[1].split("."))
            self.duration_beats[i] = b + t / r
        # time signature of each TimeSig token
        self.timesig: dict[int, tuple[int, int]] = {}
        for i in self.timesig_ids:
            num, den = self.names[i].split("_")[1].split("/")
            self.timesig[int(i)] = (int(num), int(den))

    def kind(self, token: int) -> str:
        return self.names[token].split("_")[0]


def _ts_ok(spec: TokenizerSpec, num: int, den: int) -> bool:
    return any(d == den and num in nums for d, nums in spec.time_signatures)


class DivergentTokenizer:
    """A validated REMI tokenizer plus the conversions the project needs."""

    def __init__(self, spec: TokenizerSpec, remi: REMI) -> None:
        self.spec = spec
        self.remi = remi
        self.vocab = Vocab(dict(remi.vocab))

    def __len__(self) -> int:
        return self.vocab.size

    @property
    def hash(self) -> str:
        """A short digest of the vocabulary: a model and its data must agree on it."""
        blob = json.dumps(self.vocab.names).encode()
        return hashlib.sha1(blob).hexdigest()[:12]

    def save(self, path: str | Path) -> None:
        self.remi.save(Path(path))

    def encode_score(self, score: symusic.Score) -> np.ndarray:
        """Tokens (without BOS/EOS) of a score, all non-drum parts merged into one stream."""
        merged = merge_to_one_track(score)
        if merged.note_num() == 0:
            raise TokenizerError("the music has no notes")
        seq = self.remi.encode(merged)
        if isinstance(seq, list):
            seq = seq[0]
        ids = np.asarray(seq.ids, dtype=np.int64)
        if ids.size == 0:
            raise TokenizerError("the music produced no tokens")
        return ids

    def decode_ids(self, ids: Sequence[int] | np.ndarray) -> symusic.Score:
        """A score (one track) from token ids; special tokens are dropped."""
        v = self.vocab
        keep = [int(i) for i in ids if v.names[int(i)].split("_")[0] not in _SPECIAL_KINDS]
        return self.remi.decode([keep])

    def events(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        return [self.vocab.names[int(i)] for i in ids]


_SPECIAL_KINDS = frozenset({"PAD", "BOS", "EOS", "MASK", "Concept"})


def merge_to_one_track(score: symusic.Score) -> symusic.Score:
    """All pitched notes of a score in one track (drums dropped), tempo and metre kept."""
    import symusic

    out = symusic.Score(score.tpq)
    out.time_signatures = score.time_signatures.copy()
    out.tempos = score.tempos.copy()
    track = symusic.Track(program=0, is_drum=False, name="merged")
    for t in score.tracks:
        if t.is_drum:
            continue
        track.notes.extend(t.notes)
    track.notes.sort()
    out.tracks.append(track)
    return out


def build_tokenizer(spec: TokenizerSpec | None = None) -> DivergentTokenizer:
    """A fresh tokenizer from a spec (default: the project's spec)."""
    spec = spec or TokenizerSpec()
    miditok = import_miditok()
    return DivergentTokenizer(spec, miditok.REMI(spec.miditok_config()))


def load_tokenizer(path: str | Path) -> DivergentTokenizer:
    """Load a saved tokenizer and check it is one divergent can use.

    Raises TokenizerError with the reason when the file is missing, is not a REMI
    config, or disagrees with the spec it carries (a hand-edited or foreign file).
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise TokenizerError(f"tokenizer config not found: {path}") from e
    except json.JSONDecodeError as e:
        raise TokenizerError(f"tokenizer config is not valid JSON: {path}: {e}") from e
    if raw.get("tokenization") != "REMI":
        raise TokenizerError(f"{path}: expected a REMI tokenizer, got {raw.get('tokenization')!r}")
    cfg = raw.get("config", {})
    spec_d = cfg.get("additional_params", {}).get("divergent_spec")
    if spec_d is None:
        raise TokenizerError(f"{path}: not a divergent tokenizer (no divergent_spec)")
    try:
        spec = TokenizerSpec.from_dict(json.loads(spec_d))
    except (TypeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: malformed divergent_spec: {e}") from e
    if cfg.get("use_velocities") or cfg.get("use_programs") or cfg.get("use_tempos"):
        raise TokenizerError(f"{path}: velocity, program and tempo tokens must be off")
    miditok = import_miditok()
    remi = miditok.REMI(params=path)
    tok = DivergentTokenizer(spec, remi)
    expected = build_tokenizer(spec)
    if tok.vocab.names != expected.vocab.names:
        raise TokenizerError(f"{path}: vocabulary does not match its spec")
    return tok
