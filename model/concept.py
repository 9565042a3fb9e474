"""Named concepts: Pivotal Parameters Tuning on a short reference, served without torch.

A *concept* is a performer's style learned from 30 s - 3 min of MIDI (after Chen et al.,
2024, "JEN-1 DreamStyler"; see ``docs/concepts.md``):

- **Pivotal parameters.** From the shipped torch weights, the entries of the
  self-attention weight matrices (``attn.c_attn.weight`` and ``attn.c_proj.weight`` of
  every block) that respond most to the reference are found by their *empirical Fisher
  information*: the squared gradient of the reference's next-token cross-entropy,
  accumulated over windows covering the whole reference (untransposed, identifiers in
  front). In each matrix the top ``fraction`` of entries (exactly ``round(fraction *
  size)``, ties broken by the flat index) form the mask. Only those entries are tuned;
  every other weight stays bit-identical.
- **Identifier tokens.** Each concept owns ``n_identifiers`` reserved ``Concept_i``
  tokens. Their *input* embeddings are learned (the tied output head is left alone: the
  grammar never lets the model sample a concept token), and the reference's phrases are
  trained behind them, so the concept is called by putting its identifiers first in the
  context.
- **Concept enhancement** (``A+B``): every concept keeps its own pivotal set and
  identifiers. Combining adds each concept's deltas to the base weights (where two masks
  overlap the *sum* of both deltas applies: task arithmetic, so neither concept is
  diluted), and the context starts with A's identifiers then B's. Identifier rows are
  rebound to free ``Concept_i`` slots at load time (only the vector matters: the rows are
  input embeddings), so any two concepts combine.

The result is one small ``NAME.concept.npz`` file: per pivotal matrix the mask as packed
bits and the masked deltas as float16, the identifier embeddings, and JSON metadata (the hash
of the base model's weights, fraction, steps, reference names, identifier ids, timings).
Concepts live in ``$DIVERGENT_CONCEPTS`` or ``$XDG_DATA_HOME/divergent/concepts``
(default ``~/.local/share/divergent/concepts``).

Serving is torch-free: :class:`BaseWeights` reads the fp32 weights straight from the
model folder's ``decoder.fp32.onnx`` (a minimal protobuf reader, so neither torch nor the
``onnx`` package is needed), :func:`activate` adds a concept's deltas and re-quantizes the
touched attention matrices exactly as ONNX Runtime's MatMulNBits quantizer does (8 bits,
symmetric, blocks of 16), and :meth:`ActiveConcept.bind` rebuilds the decoder session
with those initializers (``SessionOptions.add_initializer``). Only :func:`learn_concept`
and the other ``_learn*`` helpers import torch, lazily.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from divergent.model.files import LATENTS_FILE, TOKENIZER_FILE, WEIGHTS_FILE, decoder_file

if TYPE_CHECKING:
    from divergent.model.runtime import OnnxModel
    from divergent.model.tokenizer import DivergentTokenizer, Vocab

__all__ = [
    "MASK_MEASURES",
    "ActiveConcept",
    "BaseWeights",
    "Concept",
    "ConceptError",
    "ConceptMeta",
    "LearnConfig",
    "TrainingExtraMissing",
    "activate",
    "check_name",
    "concept_names",
    "default_concepts_dir",
    "learn_concept",
    "list_concepts",
    "load_concept",
    "parse_spec",
    "pivotal_names",
    "remove_concept",
]

FORMAT = "divergent-concept"
VERSION = 2  # 2: masks as packed bits, deltas as float16 (1: int32 indices, float32)
READABLE_VERSIONS = (1, 2)
SUFFIX = ".concept.npz"
#: A concept file larger than this is refused (the design promises <= 1 MB a concept).
MAX_FILE_BYTES = 1 << 20
MAX_NAME = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: names with a meaning of their own on the control surface (``/divergent/concept none``)
_RESERVED = frozenset({"none", "list", "learn", "remove"})
#: MatMulNBits layout of the int8 decoder (``export/onnx_export.py``)
Q_BLOCK = 16
#: how :func:`fisher_masks` scores entries (``LearnConfig.mask``)
MASK_MEASURES = ("fisher", "specific")
_MEASURE_TEXT = {
    "fisher": "fisher: sum of squared reference-loss gradients",
    "specific": "specific: reference Fisher / (base-sample Fisher + its mean)",
}


class ConceptError(ValueError):
    """A concept that cannot be named, found, loaded or applied (the message says why)."""


class TrainingExtraMissing(ConceptError):
    """Learning needs the training extra (torch), which this Python cannot import.

    ``divergent concept learn`` exits with :attr:`exit_code` for it, so a caller running
    it as a process (the live server) can say what to install.
    """

    install = "pip install torch==2.13.0 && pip install -e '.[train]'"
    exit_code = 3


def pivotal_names(n_layer: int) -> list[str]:
    """The torch names of the self-attention weight matrices PPT chooses from."""
    return [
        f"transformer.h.{i}.attn.{m}.weight" for i in range(n_layer) for m in ("c_attn", "c_proj")
    ]


# ------------------------------------------------------------------ names and files
def default_concepts_dir() -> Path:
    """``$DIVERGENT_CONCEPTS``, else ``$XDG_DATA_HOME/divergent/concepts``, else
    ``~/.local/share/divergent/concepts``."""
    env = os.environ.get("DIVERGENT_CONCEPTS")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "divergent" / "concepts"


def check_name(name: str) -> str:
    """``name`` if it is a safe concept name, else :class:`ConceptError`.

    1-64 characters of letters, digits, ``_ . -``, starting with a letter or digit: no
    path separators, no ``..``, no NUL, no ``+`` (which combines concepts), and not one
    of the control words (``none``, ``list``, ``learn``, ``remove``).
    """
    if not isinstance(name, str) or not name:
        raise ConceptError("a concept needs a name")
    if len(name) > MAX_NAME:
        raise ConceptError(f"concept names are at most {MAX_NAME} characters, got {len(name)}")
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise ConceptError(
            f"bad concept name {name!r}: use letters, digits, '_', '.', '-' "
            "(no slashes, '..' or '+'), starting with a letter or digit"
        )
    if name.lower() in _RESERVED:
        raise ConceptError(f"{name!r} is reserved: choose another concept name")
    return name


def parse_spec(spec: str) -> list[str]:
    """The concept names of ``A`` or ``A+B`` (checked, distinct)."""
    names = [check_name(n.strip()) for n in spec.split("+")]
    if len(set(names)) != len(names):
        raise ConceptError(f"{spec!r} names a concept twice")
    return names


def concept_path(name: str, concepts_dir: str | Path | None = None) -> Path:
    folder = Path(concepts_dir) if concepts_dir else default_concepts_dir()
    return folder / f"{check_name(name)}{SUFFIX}"


# ------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class LearnConfig:
    """How a concept is learned; validated, with a JSON round trip (stored in the file)."""

    fraction: float = 0.1  # share of each attention matrix's entries tuned
    #: 80, not 60: PPT needs its last steps more than full fine-tuning; on nine paired
    #: protocol draws its fidelity rose from 0.77x to 0.85x full_plain's, retention
    #: 0.21x -> 0.19x; ~25 s for a 2-minute reference on a 2-vCPU Xeon (docs/concepts.md)
    steps: int = 80
    lr: float = 5e-3  # Adam, for the pivotal entries (and LoRA; `full` uses its own)
    ident_lr: float = 2e-2  # Adam, for the identifier embeddings
    batch: int = 8
    window: int = 256  # reference tokens per training window
    transpose: int = 3  # augmentation: random shift in [-transpose, transpose] semitones
    n_identifiers: int = 2
    fisher_windows: int = 8
    lora_rank: int = 4  # for the `lora` comparison method only
    seed: int = 0
    threads: int = 0  # torch threads; 0 leaves torch's default
    #: bf16 autocast; None: only where the CPU computes bf16 natively (``use_bf16``:
    #: 26x slower than fp32 where it does not); the stored settings say what ran
    bf16: bool | None = None
    #: weight of the preservation term: KL(base || tuned) on reference windows *without*
    #: the identifiers, so the tuned weights act when the concept is called and keep the
    #: base model's predictions when it is not (0 turns it off)
    preserve: float = 0.5
    preserve_batch: int = 2
    #: base-model samples (prior preservation, as DreamBooth's class images) among the
    #: preservation windows; generated with ONNX Runtime at the start of learning
    general_windows: int = 8
    #: how pivotal entries are scored (:data:`MASK_MEASURES`): ``fisher``, the reference's
    #: empirical Fisher; ``specific``, that Fisher over the general windows' Fisher (plus
    #: its mean), so entries every kind of music needs are left to the base model
    mask: str = "specific"
    #: share of each batch's windows trained behind a foreign prompt: the identifiers,
    #: then ``prompt_bars`` bars of a base-model sample (not trained on), then the
    #: reference. An answer's context is the identifiers, then the performer's prompt in
    #: whatever style, then the answer; trained only on identifiers straight before the
    #: reference, the concept is asked at answer time for a case it never saw
    prompted: float = 0.5
    prompt_bars: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConceptError(f"fraction must be in (0, 1], got {self.fraction}")
        if not 0 <= self.steps <= 10_000:
            raise ConceptError(f"steps must be in 0..10000, got {self.steps}")
        if not (self.lr > 0 and self.ident_lr > 0 and math.isfinite(self.lr + self.ident_lr)):
            raise ConceptError("learning rates must be positive")
        if self.batch < 1 or self.window < 8 or self.fisher_windows < 1:
            raise ConceptError("batch >= 1, window >= 8 and fisher_windows >= 1 are required")
        if not 0 <= self.transpose <= 12:
            raise ConceptError(f"transpose must be in 0..12, got {self.transpose}")
        if not 1 <= self.n_identifiers <= 8:
            raise ConceptError(f"n_identifiers must be in 1..8, got {self.n_identifiers}")
        if self.preserve < 0 or self.preserve_batch < 1 or self.general_windows < 0:
            raise ConceptError(
                "preserve >= 0, preserve_batch >= 1 and general_windows >= 0 are required"
            )
        if self.lora_rank < 1 or self.threads < 0:
            raise ConceptError("lora_rank >= 1 and threads >= 0 are required")
        if self.mask not in MASK_MEASURES:
            raise ConceptError(f"mask must be one of {', '.join(MASK_MEASURES)}, got {self.mask!r}")
        if not 0.0 <= self.prompted <= 1.0 or not 1 <= self.prompt_bars <= 8:
            raise ConceptError("prompted must be in [0, 1] and prompt_bars in 1..8")
        if self.prompted > 0 and self.general_windows < 1:
            raise ConceptError(
                "foreign prompts are cut from base-model samples (general_windows >= 1)"
            )
        if self.mask == "specific" and self.general_windows < 1:
            raise ConceptError("the specific mask needs base-model samples (general_windows >= 1)")

    def needs_general(self, method: str) -> bool:
        """Whether ``method`` uses base-model samples: the foreign prompts (every method),
        the preservation term, or the specific mask (``ppt`` only)."""
        if self.prompted > 0:
            return True
        if method == "token_only":
            return False
        return self.preserve > 0 or (method == "ppt" and self.mask == "specific")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LearnConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConceptError(f"unknown learn settings: {sorted(unknown)}")
        types: dict[str, Callable[[Any], Any]] = {
            "mask": str,
            "bf16": lambda v: None if v is None else bool(v),
            "fraction": float,
            "lr": float,
            "ident_lr": float,
            "preserve": float,
            "prompted": float,
        }
        try:
            values: dict[str, Any] = {k: types.get(k, int)(v) for k, v in d.items()}
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ConceptError(f"malformed learn settings: {e}") from e


@dataclass
class ConceptMeta:
    """A concept file's metadata (JSON inside the file)."""

    name: str
    base_hash: str  # :func:`weights_hash` of the base model the deltas apply to
    tokenizer_hash: str
    config: LearnConfig
    references: list[str]
    identifier_ids: list[int]  # the Concept_i ids it was trained with
    reference_tokens: int
    seconds: float
    threads: int
    measure: str = _MEASURE_TEXT["fisher"]
    created: str = ""
    matrices: dict[str, list[int]] = field(default_factory=dict)  # name -> shape
    version: int = VERSION  # the file's layout (a file is always written as VERSION)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return {"format": FORMAT, **d, "version": VERSION}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConceptMeta:
        if d.get("format") != FORMAT:
            raise ConceptError("not a divergent concept file")
        if d.get("version") not in READABLE_VERSIONS:
            raise ConceptError(
                f"concept file version {d.get('version')}, this build reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        try:
            return cls(
                name=check_name(str(d["name"])),
                base_hash=str(d["base_hash"]),
                tokenizer_hash=str(d["tokenizer_hash"]),
                # version 1 had one measure and no "mask" setting: not today's default
                config=LearnConfig.from_dict({"mask": "fisher", **d["config"]}),
                references=[str(r) for r in d["references"]],
                identifier_ids=[int(i) for i in d["identifier_ids"]],
                reference_tokens=int(d["reference_tokens"]),
                seconds=float(d["seconds"]),
                threads=int(d["threads"]),
                measure=str(d.get("measure", "")),
                created=str(d.get("created", "")),
                matrices={str(k): [int(x) for x in v] for k, v in d["matrices"].items()},
                version=int(d["version"]),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ConceptError(f"malformed concept metadata: {e}") from e


def _stored_indices(
    arrays: Mapping[str, np.ndarray], k: int, size: int, *, version: int
) -> np.ndarray | None:
    """Matrix ``k``'s masked flat indices: version 1 stored them (int32), version 2 a
    packed bit mask. None when the file lacks them or the mask has the wrong length."""
    if version == 1:
        return arrays.get(f"index_{k}")
    bits = arrays.get(f"mask_{k}")
    if bits is None or bits.dtype != np.uint8 or bits.size != (size + 7) // 8:
        return None
    return np.flatnonzero(np.unpackbits(bits, count=size))


@dataclass
class Concept:
    """Masked deltas of the pivotal matrices + identifier embeddings + metadata."""

    meta: ConceptMeta
    #: torch name -> (flat indices int32 ascending, deltas float32)
    deltas: dict[str, tuple[np.ndarray, np.ndarray]]
    identifiers: np.ndarray  # (n_identifiers, n_embd) float32 input embeddings

    def to_bytes(self) -> bytes:
        """The file: per matrix the mask as packed bits and the masked deltas as float16
        (ascending flat index), the identifiers as float32, the metadata as JSON. The
        bits and half floats store a 20 % mask in half of what (int32 index, float32
        value) pairs took; the int8 re-quantization that serving applies is far coarser
        than float16's rounding, which :func:`concept_from_result` applies up front."""
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(self.meta.to_dict()).encode(), dtype=np.uint8),
            "identifiers": np.ascontiguousarray(self.identifiers, dtype=np.float32),
        }
        for k, (name, (idx, val)) in enumerate(sorted(self.deltas.items())):
            mask = np.zeros(math.prod(self.meta.matrices[name]), bool)
            mask[idx] = True
            arrays[f"name_{k}"] = np.frombuffer(name.encode(), dtype=np.uint8)
            arrays[f"mask_{k}"] = np.packbits(mask)
            arrays[f"delta_{k}"] = np.ascontiguousarray(val, dtype=np.float16)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    def save(self, path: str | Path) -> int:
        """Write atomically (a temporary file renamed), refusing more than 1 MB; bytes."""
        blob = self.to_bytes()
        if len(blob) > MAX_FILE_BYTES:
            raise ConceptError(
                f"concept {self.meta.name} would take {len(blob)} bytes (limit "
                f"{MAX_FILE_BYTES}): use a smaller --fraction"
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
        return len(blob)

    @classmethod
    def from_bytes(cls, blob: bytes, *, where: str = "concept") -> Concept:
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError) as e:
            raise ConceptError(f"{where}: not a concept file ({e})") from e
        if "meta" not in arrays or "identifiers" not in arrays:
            raise ConceptError(f"{where}: not a concept file (no metadata)")
        try:
            meta = ConceptMeta.from_dict(json.loads(arrays["meta"].tobytes().decode()))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConceptError(f"{where}: unreadable metadata ({e})") from e
        deltas: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        k = 0
        while f"name_{k}" in arrays:
            name = arrays[f"name_{k}"].tobytes().decode()
            shape = meta.matrices.get(name)
            if shape is None or f"delta_{k}" not in arrays:
                raise ConceptError(f"{where}: inconsistent deltas for {name}")
            val = arrays[f"delta_{k}"]
            idx = _stored_indices(arrays, k, math.prod(shape), version=meta.version)
            if idx is None or idx.shape != val.shape or idx.ndim != 1:
                raise ConceptError(f"{where}: inconsistent deltas for {name}")
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= math.prod(shape)):
                raise ConceptError(f"{where}: delta index out of range in {name}")
            deltas[name] = (idx.astype(np.int64), val.astype(np.float32))
            k += 1
        ident = arrays["identifiers"].astype(np.float32)
        if ident.ndim != 2 or ident.shape[0] != len(meta.identifier_ids):
            raise ConceptError(f"{where}: identifier embeddings do not match the metadata")
        return cls(meta=meta, deltas=deltas, identifiers=ident)

    @classmethod
    def load(cls, path: str | Path) -> Concept:
        path = Path(path)
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConceptError(f"{path}: {size} bytes is not a concept file (limit 1 MB)")
        return cls.from_bytes(path.read_bytes(), where=str(path))

    def dense_deltas(self) -> dict[str, np.ndarray]:
        """Each pivotal matrix's delta as a dense float32 array (zeros off the mask)."""
        out: dict[str, np.ndarray] = {}
        for name, (idx, val) in self.deltas.items():
            d = np.zeros(math.prod(self.meta.matrices[name]), np.float32)
            d[idx] = val
            out[name] = d.reshape(self.meta.matrices[name])
        return out


def load_concept(name: str, concepts_dir: str | Path | None = None) -> Concept:
    path = concept_path(name, concepts_dir)
    if not path.exists():
        known = ", ".join(c["name"] for c in list_concepts(path.parent)) or "none"
        raise ConceptError(f"no concept named {name!r} in {path.parent} (known: {known})")
    return Concept.load(path)


def list_concepts(concepts_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One summary per concept file in the folder (name order); unreadable files say so."""
    folder = Path(concepts_dir) if concepts_dir else default_concepts_dir()
    out: list[dict[str, Any]] = []
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        entry: dict[str, Any] = {"name": path.name[: -len(SUFFIX)], "bytes": path.stat().st_size}
        try:
            m = Concept.load(path).meta
        except ConceptError as e:
            entry["error"] = str(e)
        else:
            entry |= {
                "references": m.references,
                "fraction": m.config.fraction,
                "steps": m.config.steps,
                "seconds": round(m.seconds, 2),
                "base_hash": m.base_hash,
                "created": m.created,
            }
        out.append(entry)
    return out


def concept_names(concepts_dir: str | Path | None = None) -> list[str]:
    """The names of the concept files in the folder (name order), without reading them."""
    folder = Path(concepts_dir) if concepts_dir else default_concepts_dir()
    if not folder.is_dir():
        return []
    return sorted(path.name[: -len(SUFFIX)] for path in folder.glob(f"*{SUFFIX}"))


def remove_concept(name: str, concepts_dir: str | Path | None = None) -> Path:
    path = concept_path(name, concepts_dir)
    if not path.exists():
        raise ConceptError(f"no concept named {name!r} in {path.parent}")
    path.unlink()
    return path


# ------------------------------------------------------------------ reading ONNX without onnx
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of one protobuf message's fields."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
            yield num, wire, val, pos
        elif wire == 1:
            yield num, wire, pos, pos + 8
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            yield num, wire, pos, pos + n
            pos += n
        elif wire == 5:
            yield num, wire, pos, pos + 4
            pos += 4
        else:
            raise ConceptError(f"unsupported protobuf wire type {wire}")


# ONNX TensorProto data types this reader understands
_ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64}


def read_onnx_initializers(
    path: str | Path, names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Initializers of an ONNX file (all, or those named), read with a minimal protobuf
    reader: ModelProto.graph (7) -> GraphProto.initializer (5) -> TensorProto dims (1),
    data_type (2), name (8), raw_data (9) or float_data (4). Serving has neither torch
    nor the ``onnx`` package."""
    buf = Path(path).read_bytes()
    want = set(names) if names is not None else None
    out: dict[str, np.ndarray] = {}
    for num, wire, gs, ge in _fields(buf, 0, len(buf)):
        if num != 7 or wire != 2:
            continue
        for gnum, gwire, ts, te in _fields(buf, gs, ge):
            if gnum != 5 or gwire != 2:
                continue
            dims: list[int] = []
            dtype = 0
            name = ""
            raw: tuple[int, int] | None = None
            floats: tuple[int, int] | None = None
            for tnum, twire, a, b in _fields(buf, ts, te):
                if tnum == 1 and twire == 0:
                    dims.append(a)
                elif tnum == 1 and twire == 2:  # packed dims
                    p = a
                    while p < b:
                        d, p = _varint(buf, p)
                        dims.append(d)
                elif tnum == 2:
                    dtype = a
                elif tnum == 8:
                    name = buf[a:b].decode()
                elif tnum == 9:
                    raw = (a, b)
                elif tnum == 4 and twire == 2:
                    floats = (a, b)
            if want is not None and name not in want:
                continue
            if dtype not in _ONNX_DTYPES:
                continue
            np_type = _ONNX_DTYPES[dtype]
            span = raw if raw is not None else (floats if dtype == 1 else None)
            if span is None:
                continue
            arr = np.frombuffer(buf[span[0] : span[1]], dtype=np.dtype(np_type).newbyteorder("<"))
            out[name] = arr.reshape(dims).astype(np_type)
    if want is not None and want - set(out):
        raise ConceptError(f"{path}: missing initializers {sorted(want - set(out))[:4]}")
    return out


def onnx_initializer_names(path: str | Path) -> set[str]:
    """Names of all initializers of an ONNX file."""
    buf = Path(path).read_bytes()
    names: set[str] = set()
    for num, wire, gs, ge in _fields(buf, 0, len(buf)):
        if num != 7 or wire != 2:
            continue
        for gnum, gwire, ts, te in _fields(buf, gs, ge):
            if gnum == 5 and gwire == 2:
                for tnum, _tw, a, b in _fields(buf, ts, te):
                    if tnum == 8:
                        names.add(buf[a:b].decode())
    return names


# ------------------------------------------------------------------ base weights and hashing
def weights_hash(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 (first 16 hex digits) of named float32 arrays in torch layout, name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name], dtype="<f4")
        h.update(name.encode() + b"\0" + struct.pack("<I", a.ndim))
        h.update(struct.pack(f"<{a.ndim}I", *a.shape))
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _hashed_names(n_layer: int) -> list[str]:
    # what a concept touches: the pivotal matrices and the input embedding table
    return [*pivotal_names(n_layer), "transformer.wte.weight"]


def quantize_blockwise(w_t: np.ndarray, block: int = Q_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's MatMulNBits 8-bit symmetric quantization of a (K, N) MatMul weight.

    Per output column and block of ``block`` rows: scale = v / -128 where v is the
    entry of largest magnitude (signed); q = round_half_up(w * (1 / scale) + 128) in
    float32, clipped to 0..255, as uint8 in (N, K / block, block) layout; scales
    (N, K / block). This order of operations (a reciprocal, the offset added before
    rounding) reproduces every byte of the bundled int8 decoder (checked in the tests);
    ``rint(w / scale)`` differed in 1-4 entries per matrix.
    """
    K, N = w_t.shape
    if K % block:
        raise ConceptError(f"K = {K} is not a multiple of the block size {block}")
    wb = np.ascontiguousarray(w_t.T, dtype=np.float32).reshape(N, K // block, block)
    arg = np.abs(wb).argmax(-1)
    vmax = np.take_along_axis(wb, arg[..., None], -1)[..., 0]
    scale = (vmax / np.float32(-128.0)).astype(np.float32)
    recip = np.where(scale == 0, np.float32(0.0), np.float32(1.0) / np.where(scale == 0, 1, scale))
    y = (wb * recip.astype(np.float32)[..., None] + np.float32(128.0)).astype(np.float32)
    low = np.floor(y)
    q = np.clip(low + (y - low >= 0.5), 0, 255).astype(np.uint8)
    return q, scale


class BaseWeights:
    """The base model's weights a concept applies to, read from a model folder (no torch).

    ``fp32`` holds the pivotal matrices and the input embedding table in torch layout
    (from ``decoder.fp32.onnx``, whose MatMul weights are stored transposed); ``hash`` is
    their :func:`weights_hash`, the same value :func:`learn_concept` computes from
    ``model.pt``, so a concept learned on another model is recognised and refused.
    """

    def __init__(self, model_dir: str | Path, n_layer: int) -> None:
        self.root = Path(model_dir)
        fp32 = self.root / decoder_file("fp32")
        if not fp32.exists():
            raise ConceptError(f"concepts need {fp32} (the fp32 decoder) in the model folder")
        graph_names = [
            n + "_T"
            if n.endswith(".attn.c_attn.weight") or n.endswith(".attn.c_proj.weight")
            else n
            for n in _hashed_names(n_layer)
        ]
        arrays = read_onnx_initializers(fp32, graph_names)
        self.fp32: dict[str, np.ndarray] = {}
        for name, gname in zip(_hashed_names(n_layer), graph_names, strict=True):
            a = arrays[gname]
            self.fp32[name] = np.ascontiguousarray(a.T) if gname.endswith("_T") else a
        self.hash = weights_hash(self.fp32)
        self._graph_names: dict[str, set[str]] = {}

    def graph_names(self, precision: str) -> set[str]:
        if precision not in self._graph_names:
            self._graph_names[precision] = onnx_initializer_names(
                self.root / decoder_file(precision)
            )
        return self._graph_names[precision]


def decoder_overrides(
    precision: str,
    graph_names: set[str],
    weights: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Initializer values replacing the decoder's, for new weights given in torch names.

    A weight the graph stores as MatMulNBits (``<name>_T_Q8`` + ``_scales``) is
    re-quantized; one stored transposed in fp32 (``<name>_T``) is transposed; one stored
    as is (embedding tables, biases, LayerNorm) is passed through.
    """
    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        w = np.asarray(w, dtype=np.float32)
        if name + "_T_Q8" in graph_names:
            q, s = quantize_blockwise(w.T)
            out[name + "_T_Q8"], out[name + "_T_scales"] = q, s
        elif name + "_T" in graph_names:
            out[name + "_T"] = np.ascontiguousarray(w.T)
        elif name in graph_names:
            out[name] = np.ascontiguousarray(w)
        else:
            raise ConceptError(f"the {precision} decoder has no initializer for {name}")
    return out


@dataclass
class ActiveConcept:
    """One concept or a combination, ready to bind to a decoder.

    ``prefix`` is the identifier ids the context starts with; ``overrides`` the decoder
    initializers that replace the base model's (graph names -> arrays).
    """

    names: list[str]
    prefix: list[int]
    overrides: dict[str, np.ndarray]
    precision: str
    load_ms: float = 0.0

    @property
    def spec(self) -> str:
        return "+".join(self.names)

    def bind(self, model: OnnxModel) -> OnnxModel:
        """A copy of ``model`` whose decoder session carries the concept's weights."""
        if model.precision != self.precision:
            raise ConceptError(
                f"concept prepared for the {self.precision} decoder, model is {model.precision}"
            )
        return model.with_decoder_initializers(self.overrides)


def _weights_with(
    base: BaseWeights,
    concepts: Sequence[Concept],
    vocab_concept_ids: np.ndarray,
) -> tuple[dict[str, np.ndarray], list[int]]:
    """New pivotal matrices and embedding table for concepts applied together, and the
    context prefix. The combination rule: deltas add (where masks overlap, the sum)."""
    weights: dict[str, np.ndarray] = {}
    for c in concepts:
        for name, d in c.dense_deltas().items():
            if name not in base.fp32 or base.fp32[name].shape != d.shape:
                raise ConceptError(f"concept {c.meta.name}: {name} does not fit the model")
            weights[name] = weights.get(name, base.fp32[name]) + d
    wte = base.fp32["transformer.wte.weight"].copy()
    prefix: list[int] = []
    slot = 0
    for c in concepts:
        n = c.identifiers.shape[0]
        if slot + n > len(vocab_concept_ids):
            raise ConceptError(
                f"{'+'.join(x.meta.name for x in concepts)} needs more than the "
                f"{len(vocab_concept_ids)} reserved concept tokens"
            )
        if c.identifiers.shape[1] != wte.shape[1]:
            raise ConceptError(f"concept {c.meta.name}: identifier size does not fit the model")
        ids = [int(i) for i in vocab_concept_ids[slot : slot + n]]
        wte[ids] = c.identifiers
        prefix += ids
        slot += n
    weights["transformer.wte.weight"] = wte
    return weights, prefix


def activate(
    spec: str,
    model: OnnxModel,
    concepts_dir: str | Path | None = None,
    *,
    base: BaseWeights | None = None,
) -> ActiveConcept:
    """Load ``A`` or ``A+B`` for ``model``: checks each concept's base-model hash, adds the
    deltas (sum where masks overlap) and prepares the decoder initializers.

    ``base`` may be kept between calls (a server switching concepts) to skip re-reading
    the fp32 weights.
    """
    t0 = time.perf_counter()
    names = parse_spec(spec)
    concepts = [load_concept(n, concepts_dir) for n in names]
    return activate_concepts(concepts, model, base=base, t0=t0)


def activate_concepts(
    concepts: Sequence[Concept],
    model: OnnxModel,
    *,
    base: BaseWeights | None = None,
    t0: float | None = None,
) -> ActiveConcept:
    """:func:`activate` for concepts already in memory."""
    t0 = time.perf_counter() if t0 is None else t0
    base = base or BaseWeights(model.files.root, model.n_layer)
    for c in concepts:
        if c.meta.base_hash != base.hash:
            raise ConceptError(
                f"concept {c.meta.name!r} was learned on another base model (weights "
                f"{c.meta.base_hash}, this model {base.hash}): learn it again on this model"
            )
        if c.meta.tokenizer_hash != model.tokenizer.hash:
            raise ConceptError(f"concept {c.meta.name!r} was learned with another tokenizer")
    weights, prefix = _weights_with(base, concepts, model.tokenizer.vocab.concept_ids)
    overrides = decoder_overrides(model.precision, base.graph_names(model.precision), weights)
    return ActiveConcept(
        names=[c.meta.name for c in concepts],
        prefix=prefix,
        overrides=overrides,
        precision=model.precision,
        load_ms=(time.perf_counter() - t0) * 1000,
    )


# ------------------------------------------------------------------ learning (torch)
def reference_ids(refs: Sequence[str | Path], tokenizer: DivergentTokenizer) -> list[np.ndarray]:
    """REMI ids of reference MIDI files (clear errors for missing or empty files)."""
    import symusic

    from divergent.model.tokenizer import TokenizerError

    out = []
    for r in refs:
        path = Path(r)
        if not path.exists():
            raise ConceptError(f"reference not found: {path}")
        try:
            score = symusic.Score(str(path))
        except Exception as e:  # symusic raises RuntimeError/ValueError with C++ messages
            raise ConceptError(f"cannot read {path} as MIDI: {e}") from e
        try:
            out.append(tokenizer.encode_score(score))
        except TokenizerError as e:
            raise ConceptError(f"{path}: {e}") from e
    return out


class _Windows:
    """Training windows of the references (joined, BOS before each), starting at bars."""

    def __init__(
        self, refs: Sequence[np.ndarray], vocab: Vocab, cfg: LearnConfig, block_size: int
    ) -> None:
        parts = [np.concatenate([[vocab.bos], np.asarray(r, np.int64)]) for r in refs]
        self.ids = np.concatenate(parts).astype(np.int64)
        if len(self.ids) < 9:
            raise ConceptError(f"the reference is too short ({len(self.ids)} tokens)")
        # the identifiers and the window share the model's positions
        self.T = min(cfg.window, block_size - cfg.n_identifiers, len(self.ids) - 1)
        last = len(self.ids) - self.T - 1
        marks = np.flatnonzero((self.ids == vocab.bar) | (self.ids == vocab.bos))
        starts = marks[marks <= last]
        self.starts = starts if len(starts) else np.array([0])
        self.vocab = vocab
        self.cfg = cfg

    def fisher(self) -> np.ndarray:
        """Evenly spaced windows covering the reference, untransposed."""
        n = self.cfg.fisher_windows
        pick = np.unique(np.linspace(0, len(self.starts) - 1, n).round().astype(np.int64))
        return np.stack([self.ids[s : s + self.T + 1] for s in self.starts[pick]])

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        from divergent.model.data import transpose_ids

        rows = []
        for s in rng.choice(self.starts, size=self.cfg.batch):
            w = self.ids[s : s + self.T + 1]
            k = int(rng.integers(-self.cfg.transpose, self.cfg.transpose + 1))
            shifted = transpose_ids(w, k, self.vocab)
            rows.append(shifted if shifted is not None else w)
        return np.stack(rows)

    def prompts(self, general: np.ndarray | None) -> list[np.ndarray]:
        """Foreign prompts: every run of ``prompt_bars`` bars (Bar first) in the base-model
        samples, at most half a window long."""
        if general is None or self.cfg.prompted <= 0:
            return []
        out = []
        for row in general:
            marks = np.flatnonzero(row == self.vocab.bar)
            for a, b in zip(marks, marks[self.cfg.prompt_bars :], strict=False):
                if b - a <= self.T // 2:
                    out.append(row[a:b])
        return out

    def behind_prompts(
        self, rows: np.ndarray, prompts: Sequence[np.ndarray], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, untrained): a ``prompted`` share of ``rows`` rewritten as BOS, a foreign
        prompt, then the reference window (its BOS dropped), cut to the same length;
        ``untrained[i]``: how many leading tokens of row i are not predicted (BOS and
        the prompt), 0 for rows left as they were."""
        untrained = np.zeros(len(rows), np.int64)
        if not prompts:
            return rows, untrained
        rows = rows.copy()
        n = round(self.cfg.prompted * len(rows))
        for i in rng.choice(len(rows), size=n, replace=False):
            p = prompts[int(rng.integers(len(prompts)))]
            ref = rows[i, 1:] if rows[i, 0] == self.vocab.bos else rows[i]
            row = np.concatenate([[self.vocab.bos], p, ref])[: rows.shape[1]]
            rows[i] = row
            untrained[i] = 1 + len(p)
        return rows, untrained


def general_windows(
    model_dir: str | Path, n: int, length: int, *, seed: int = 0, threads: int = 1
) -> np.ndarray:
    """``n`` base-model samples of ``length`` + 1 tokens (BOS first), torch-free.

    The int8 decoder samples grammar-valid REMI (temperature 1, top-p 0.95) from BOS
    under latents of training phrases (``latents.npy``; the prior without it): "general"
    music in the base model's own distribution, the prior-preservation data that keeps a
    concept from changing what the model does when the concept is not called.
    """
    from divergent.model.grammar import RemiGrammar, Sampler
    from divergent.model.runtime import IncrementalDecoder, OnnxModel

    if n == 0:
        return np.zeros((0, length + 1), np.int64)
    onnx = OnnxModel(model_dir, threads=threads)
    v = onnx.tokenizer.vocab
    rng = np.random.default_rng(seed)
    bank = Path(model_dir) / LATENTS_FILE
    if bank.exists():
        lat = np.load(bank)
        zs = lat[rng.choice(len(lat), size=n)].astype(np.float32)
    else:
        zs = rng.standard_normal((n, onnx.z_dim)).astype(np.float32)
    dec = IncrementalDecoder(onnx)
    rows = []
    for i in range(n):
        grammar = RemiGrammar(v)
        sampler = Sampler(v.size, seed=seed * 1000 + i)
        dec.reset()
        dec.set_z(zs[i])
        dec.feed([v.bos])
        toks = [v.bos]
        while len(toks) <= length:
            tok = sampler.sample(dec.last_logits, grammar.mask(), temperature=1.0, top_p=0.95)
            grammar.feed(tok)
            toks.append(tok)
            dec.feed([tok])
        rows.append(toks)
    return np.asarray(rows, np.int64)


@dataclass
class LearnResult:
    """What a tuning method produced (torch-free arrays)."""

    method: str
    #: torch name -> new dense weights (only tensors that may have changed)
    weights: dict[str, np.ndarray]
    identifiers: np.ndarray  # (n, C)
    masks: dict[str, np.ndarray]  # ppt only: torch name -> bool mask
    trainable_params: int
    seconds: float
    threads: int
    losses: list[float]
    state_bytes: int  # what storing the method's result costs (float32, or the file)


def _forward(model: Any, prefix: Any, x: Any, z: Any) -> Any:
    """Logits of ``[prefix embeddings] + tokens`` (the decoder's training forward, with
    the identifier rows given as embeddings so the tied output head is untouched)."""
    import torch

    tr = model.transformer
    B = x.shape[0]
    emb = torch.cat([prefix.unsqueeze(0).expand(B, -1, -1), tr.wte(x)], dim=1)
    pos = torch.arange(emb.shape[1])
    h = emb + tr.wpe(pos) + tr.wz(z).unsqueeze(1)
    for block in tr.h:
        h = block(h)
    return model.lm_head(tr.ln_f(h))


def _loss(
    model: Any,
    prefix: Any,
    windows: np.ndarray,
    z: Any,
    bf16: bool,
    untrained: np.ndarray | None = None,
) -> Any:
    """Next-token loss of ``windows`` behind the identifiers; ``untrained[i]`` leading
    tokens of row i (a foreign prompt) are context only."""
    import torch

    w = torch.from_numpy(windows)
    n = prefix.shape[0]
    x = w[:, :-1]
    targets = torch.cat([torch.full((w.shape[0], n - 1), -1, dtype=torch.long), w], dim=1)
    if untrained is not None:
        for i, k in enumerate(untrained):
            targets[i, n - 1 : n - 1 + int(k)] = -1
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = _forward(model, prefix, x, z)
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1
    )


def _preservation_targets(
    model: Any,
    windows: _Windows,
    general: np.ndarray | None,
    cfg: LearnConfig,
    rng: np.random.Generator,
    gen: Any,
) -> tuple[Any, Any, Any]:
    """(inputs, latents, base log-probabilities) of the preservation windows: base-model
    samples (``general``) and ``batch`` reference windows, all without identifiers —
    what the tuned model must still predict when the concept is not called."""
    import torch

    w = windows.sample(rng)
    if general is not None and len(general) and general.shape[1] >= w.shape[1]:
        w = np.concatenate([general[:, : w.shape[1]], w])
    x = torch.from_numpy(w[:, :-1])
    z = torch.randn(len(w), model.cfg.z_dim, generator=gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(cfg.bf16)):
        logits = model.decode(x, z)
    return x, z, torch.log_softmax(logits.float(), dim=-1)


def _preservation(
    model: Any, targets: tuple[Any, Any, Any], cfg: LearnConfig, rng: np.random.Generator
) -> Any:
    """KL(base || tuned) per token on a few of the preservation windows."""
    import torch
    from torch.nn import functional as F

    x, z, logq = targets
    pick = torch.from_numpy(rng.choice(len(x), size=min(cfg.preserve_batch, len(x)), replace=False))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(cfg.bf16)):
        logits = model.decode(x[pick], z[pick])
    logp = F.log_softmax(logits.float(), dim=-1)
    q = logq[pick]
    return (q.exp() * (q - logp)).sum(-1).mean()


def _fisher(
    model: Any, prefix: Any | None, windows: np.ndarray, names: Sequence[str], bf16: bool, gen: Any
) -> dict[str, Any]:
    """Per matrix, the sum over ``windows`` (one at a time) of the squared gradient of the
    next-token loss: the empirical Fisher's diagonal. ``prefix`` None: no identifiers."""
    import torch

    params = dict(model.named_parameters())
    scores = {n: torch.zeros_like(params[n]) for n in names}
    for w in windows:
        model.zero_grad(set_to_none=True)
        z = torch.randn(1, model.cfg.z_dim, generator=gen)
        if prefix is None:
            x = torch.from_numpy(w[None])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model.decode(x[:, :-1], z)
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
            )
        else:
            loss = _loss(model, prefix, w[None], z, bf16)
        loss.backward()
        for n in names:
            g = params[n].grad
            if g is not None:
                scores[n] += g.float() ** 2
    model.zero_grad(set_to_none=True)
    return scores


def fisher_masks(
    model: Any,
    prefix: Any,
    windows: _Windows,
    fraction: float,
    *,
    bf16: bool,
    seed: int,
    measure: str = "fisher",
    general: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(masks, scores) of the pivotal matrices: per matrix, the ``round(fraction * size)``
    entries with the largest score.

    ``fisher``: the reference's empirical Fisher (accumulated squared gradient of the
    reference loss, one window at a time). ``specific``: that Fisher divided by the
    Fisher of ``general`` (base-model samples, no identifiers) plus its matrix mean. The
    plain Fisher picks many entries every kind of music leans on (two concepts' masks
    shared 46 %); tuning those moves the model when the concept is not called, too.
    """
    import torch

    if measure not in MASK_MEASURES:
        raise ConceptError(f"unknown mask measure {measure!r}")
    names = pivotal_names(model.cfg.n_layer)
    gen = torch.Generator().manual_seed(seed)
    scores = _fisher(model, prefix, windows.fisher(), names, bf16, gen)
    if measure == "specific":
        if general is None or not len(general):
            raise ConceptError("the specific mask needs base-model samples (general_windows > 0)")
        T = windows.T + 1
        gen_rows = general[:, :T] if general.shape[1] >= T else general
        base = _fisher(model, None, gen_rows, names, bf16, gen)
        scores = {n: scores[n] / (base[n] + base[n].mean()) for n in names}
    masks: dict[str, np.ndarray] = {}
    for n in names:
        s = scores[n].flatten().numpy()
        k = round(fraction * s.size)
        # stable descending order: ties go to the lower flat index, deterministically
        keep = np.argsort(-s, kind="stable")[:k]
        m = np.zeros(s.size, bool)
        m[keep] = True
        masks[n] = m.reshape(scores[n].shape)
    return masks, {n: scores[n].numpy() for n in names}


class _LoRA:
    """Rank-r adapters on a Linear: y = x W^T + b + (x A^T) B^T * (alpha / r)."""

    @staticmethod
    def wrap(linear: Any, rank: int, gen: Any) -> Any:
        import torch

        class LoRALinear(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.base = linear
                out_f, in_f = linear.weight.shape
                self.A = torch.nn.Parameter(torch.randn(rank, in_f, generator=gen) / in_f**0.5)
                self.B = torch.nn.Parameter(torch.zeros(out_f, rank))
                self.scale = 1.0  # alpha = r

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.base(x) + (x @ self.A.t()) @ self.B.t() * self.scale

            def merged(self) -> torch.Tensor:
                return self.base.weight + self.B @ self.A * self.scale

        return LoRALinear()


def _learn(
    model: Any,
    refs: Sequence[np.ndarray],
    vocab: Vocab,
    cfg: LearnConfig,
    method: str,
    *,
    progress: bool = True,
    general: np.ndarray | None = None,
) -> LearnResult:
    """Tune ``model`` (a loaded torch DivergentModel, changed in place) on the references.

    ``general``: base-model samples for the preservation term (:func:`general_windows`).
    ``method``: ``ppt`` (pivotal entries + identifiers), ``token_only`` (identifiers),
    ``full`` (every decoder weight + identifiers), ``lora`` (rank-``lora_rank`` adapters on
    the attention projections + identifiers). Same windows, steps and seed for all.
    """
    import torch
    from tqdm import tqdm

    from divergent.model.train_config import use_bf16

    if method not in ("ppt", "token_only", "full", "lora"):
        raise ConceptError(f"unknown method {method!r}")
    cfg = replace(cfg, bf16=use_bf16(cfg.bf16))  # None: bf16 only where the CPU has it
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    windows = _Windows(refs, vocab, cfg, model.cfg.block_size)
    model.eval()  # dropout is 0; eval keeps every forward deterministic
    for p in model.parameters():
        p.requires_grad_(False)
    # the preservation term's targets: the base model's predictions on fixed windows,
    # computed once before tuning (token_only changes no weight, so it needs none)
    preserve = None
    if cfg.preserve > 0 and method != "token_only":
        preserve = _preservation_targets(model, windows, general, cfg, rng, gen)
    ids = [int(i) for i in vocab.concept_ids[: cfg.n_identifiers]]
    wte = model.transformer.wte.weight
    prefix = torch.nn.Parameter(wte.detach()[ids].clone())
    names = pivotal_names(model.cfg.n_layer)
    params = dict(model.named_parameters())
    masks: dict[str, np.ndarray] = {}
    groups: list[dict[str, Any]] = [{"params": [prefix], "lr": cfg.ident_lr}]
    trainable = prefix.numel()
    loras: dict[str, Any] = {}
    if method == "ppt":
        for n in names:
            params[n].requires_grad_(True)
        masks, _ = fisher_masks(
            model,
            prefix,
            windows,
            cfg.fraction,
            bf16=bool(cfg.bf16),
            seed=cfg.seed,
            measure=cfg.mask,
            general=general,
        )
        for n in names:
            m = torch.from_numpy(masks[n])
            # frozen entries get exactly zero gradient, so Adam (no weight decay) leaves
            # them bit-identical; the file stores only the masked entries anyway
            params[n].register_hook(lambda g, m=m: g * m)
            trainable += int(masks[n].sum())
        groups.append({"params": [params[n] for n in names], "lr": cfg.lr})
    elif method == "full":
        dec = [p for n, p in model.named_parameters() if not n.startswith(("encoder.", "bow_"))]
        for p in dec:
            p.requires_grad_(True)
        trainable += sum(p.numel() for p in dec)
        groups.append({"params": dec, "lr": cfg.lr})
    elif method == "lora":
        for i, block in enumerate(model.transformer.h):
            for attr in ("c_attn", "c_proj"):
                wrapped = _LoRA.wrap(getattr(block.attn, attr), cfg.lora_rank, gen)
                setattr(block.attn, attr, wrapped)
                loras[f"transformer.h.{i}.attn.{attr}.weight"] = wrapped
        lp = [p for w in loras.values() for p in (w.A, w.B)]
        trainable += sum(p.numel() for p in lp)
        groups.append({"params": lp, "lr": cfg.lr})
    opt = torch.optim.Adam(groups, weight_decay=0.0)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=f"learning ({method})", disable=not progress, leave=False)
    prompts = windows.prompts(general)
    for _ in bar:
        z = torch.randn(cfg.batch, model.cfg.z_dim, generator=gen)
        rows = windows.sample(rng)
        rows, untrained = windows.behind_prompts(rows, prompts, rng)
        loss = _loss(model, prefix, rows, z, bool(cfg.bf16), untrained)
        if preserve is not None:
            loss = loss + cfg.preserve * _preservation(model, preserve, cfg, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    weights: dict[str, np.ndarray] = {}
    state_bytes = 4 * prefix.numel()
    with torch.no_grad():
        if method == "ppt":
            weights = {n: params[n].detach().numpy().copy() for n in names}
            state_bytes += 8 * sum(int(m.sum()) for m in masks.values())
        elif method == "full":
            weights = {
                n: p.detach().numpy().copy()
                for n, p in model.named_parameters()
                if not n.startswith(("encoder.", "bow_"))
            }
            weights["lm_head.weight"] = model.lm_head.weight.detach().numpy().copy()
            state_bytes += 4 * (trainable - prefix.numel())
        elif method == "lora":
            for n, w in loras.items():
                weights[n] = w.merged().detach().numpy().copy()
            # unwrap, so the torch model is an ordinary model with merged weights
            for block in model.transformer.h:
                for attr in ("c_attn", "c_proj"):
                    w = getattr(block.attn, attr)
                    w.base.weight.copy_(w.merged())
                    setattr(block.attn, attr, w.base)
            state_bytes += 4 * (trainable - prefix.numel())
    return LearnResult(
        method=method,
        weights=weights,
        identifiers=prefix.detach().numpy().copy(),
        masks=masks,
        trainable_params=int(trainable),
        seconds=time.perf_counter() - t0,
        threads=threads,
        losses=losses,
        state_bytes=int(state_bytes),
    )


def torch_weights_hash(model: Any) -> str:
    """:func:`weights_hash` of a torch model's concept-relevant weights."""
    sd = model.state_dict()
    return weights_hash(
        {n: sd[n].detach().float().numpy() for n in _hashed_names(model.cfg.n_layer)}
    )


def concept_from_result(
    name: str,
    res: LearnResult,
    base_state: Mapping[str, np.ndarray],
    *,
    base_hash: str,
    tokenizer_hash: str,
    cfg: LearnConfig,
    references: Sequence[str],
    identifier_ids: Sequence[int],
    reference_tokens: int,
) -> Concept:
    """The file form of a PPT result: masked deltas only."""
    deltas: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    matrices: dict[str, list[int]] = {}
    for n, m in res.masks.items():
        idx = np.flatnonzero(m.ravel()).astype(np.int32)
        delta = (res.weights[n].ravel() - base_state[n].ravel())[idx]
        # the file keeps float16 (see Concept.to_bytes): round here, so what is served
        # now and what is loaded later are the same numbers
        delta = delta.astype(np.float16).astype(np.float32)
        deltas[n] = (idx, delta)
        matrices[n] = list(m.shape)
    meta = ConceptMeta(
        name=check_name(name),
        base_hash=base_hash,
        tokenizer_hash=tokenizer_hash,
        config=cfg,
        references=list(references),
        identifier_ids=[int(i) for i in identifier_ids],
        reference_tokens=int(reference_tokens),
        seconds=float(res.seconds),
        threads=int(res.threads),
        measure=_MEASURE_TEXT[cfg.mask],
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        matrices=matrices,
    )
    return Concept(meta=meta, deltas=deltas, identifiers=res.identifiers.astype(np.float32))


def learn_concept(
    name: str,
    refs: Sequence[str | Path],
    *,
    config: LearnConfig | None = None,
    concepts_dir: str | Path | None = None,
    model_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> tuple[Concept, Path, dict[str, Any]]:
    """``divergent concept learn``: learn ``name`` from reference MIDI files with PPT.

    Reads the torch weights (``checkpoint``, default ``<model_dir>/model.pt``), checks
    they are the weights of the model folder's decoder (same :func:`weights_hash`),
    tunes, and writes ``<concepts_dir>/<name>.concept.npz``. Returns (concept, path,
    summary).
    """
    check_name(name)
    if not refs:
        raise ConceptError("learning a concept needs at least one reference MIDI file")
    cfg = config or LearnConfig()
    t0 = time.perf_counter()
    try:
        import torch  # noqa: F401  (the training extra)
    except ImportError as e:
        raise TrainingExtraMissing(
            "learning concepts needs torch: pip install 'divergent[train]' (torch==2.13.0 first)"
        ) from e
    from divergent.model.train_config import use_bf16

    cfg = replace(cfg, bf16=use_bf16(cfg.bf16))  # what runs, and what the file records
    from divergent.model.runtime import default_model_dir
    from divergent.model.tokenizer import load_tokenizer
    from divergent.model.train import load_model

    root = Path(model_dir) if model_dir else default_model_dir()
    ckpt = Path(checkpoint) if checkpoint else root / WEIGHTS_FILE
    if not ckpt.exists():
        raise ConceptError(f"learning needs the torch weights {ckpt}")
    tok = load_tokenizer(root / TOKENIZER_FILE)
    ids = reference_ids(refs, tok)
    model, _ = load_model(ckpt)
    base_hash = torch_weights_hash(model)
    folder_hash = BaseWeights(root, model.cfg.n_layer).hash
    if folder_hash != base_hash:
        raise ConceptError(
            f"{ckpt} (weights {base_hash}) is not the model in {root} ({folder_hash})"
        )
    base_state = {n: model.state_dict()[n].numpy().copy() for n in pivotal_names(model.cfg.n_layer)}
    t_gen = time.perf_counter()
    general = (
        general_windows(root, cfg.general_windows, cfg.window, seed=cfg.seed)
        if cfg.needs_general("ppt")
        else None
    )
    t_gen = time.perf_counter() - t_gen
    res = _learn(model, ids, tok.vocab, cfg, "ppt", progress=progress, general=general)
    res.seconds += t_gen  # sampling the preservation data is part of learning
    concept = concept_from_result(
        name,
        res,
        base_state,
        base_hash=base_hash,
        tokenizer_hash=tok.hash,
        cfg=cfg,
        references=[Path(r).name for r in refs],
        identifier_ids=tok.vocab.concept_ids[: cfg.n_identifiers].tolist(),
        reference_tokens=sum(len(r) for r in ids),
    )
    path = concept_path(name, concepts_dir)
    size = concept.save(path)
    summary = {
        "name": name,
        "path": str(path),
        "bytes": size,
        "learn_seconds": round(res.seconds, 2),
        "sampling_seconds": round(t_gen, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "threads": res.threads,
        "reference_tokens": concept.meta.reference_tokens,
        "trainable_params": res.trainable_params,
        "fraction": cfg.fraction,
        "steps": cfg.steps,
        "loss_first": round(res.losses[0], 4) if res.losses else None,
        "loss_last": round(float(np.mean(res.losses[-5:])), 4) if res.losses else None,
        "base_hash": base_hash,
    }
    return concept, path, summary
