"""The training data: music21's bundled corpus (and a user's MIDI folder) as token ids.

``divergent data build`` runs :func:`build_dataset`:

1. list the *works*: every tune of every ABC opus file, every other score file in
   music21's corpus, every MIDI file of ``--midi DIR``;
2. convert each work to a ``symusic.Score``: ABC tunes through symusic's own ABC reader
   (about 30x faster than music21), the rest through music21 and a MIDI file cached
   under ``<out>/cache/midi`` (the slow step: it runs once);
3. tokenize (one merged REMI stream) and split **by work**, deterministically from the
   work's id, into train and validation;
4. write ``train.bin`` / ``val.bin`` (uint16 ids, each work as BOS ... EOS), their work
   offsets, the tokenizer config and ``manifest.json`` (every work, its split and size,
   and a summary of failures and fixes).

Transposition augmentation happens at training time on the ids (:func:`transpose_ids`),
so the dataset on disk stays one copy of each work.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from divergent.model.files import (
    COPY_INDEX_FILE,
    FEATURE_REFERENCE_FILE,
    MANIFEST_FILE,
    TOKENIZER_FILE,
)
from divergent.model.tokenizer import DivergentTokenizer, TokenizerError, Vocab, build_tokenizer

log = logging.getLogger(__name__)

__all__ = [
    "DatasetFiles",
    "Work",
    "build_dataset",
    "is_validation",
    "list_corpus_works",
    "list_midi_works",
    "load_split",
    "transpose_ids",
]

#: Share of works held out for validation (by a hash of the work id).
VAL_PERCENT = 5
#: music21 corpus folders that are not notated music (roman-numeral analyses, exercises).
_SKIP_EXT = {".rntxt"}
_SCORE_EXT = {".krn", ".mxl", ".xml", ".musicxml", ".mid", ".midi"}


@dataclass(frozen=True)
class Work:
    """One piece of music: the unit of the train/validation split."""

    id: str
    source: str  # corpus collection or "user"
    kind: str  # "abc", "music21" or "midi"
    path: str
    abc: str | None = None  # the tune's ABC text (file header + tune), for kind "abc"


def is_validation(work_id: str, percent: int = VAL_PERCENT) -> bool:
    """Deterministic split by work: the same work is always on the same side."""
    h = int(hashlib.sha1(work_id.encode()).hexdigest()[:8], 16)
    return h % 100 < percent


def _split_abc(text: str) -> tuple[str, list[tuple[str, str]]]:
    """An ABC file's header and its tunes as (X number, tune text)."""
    parts = re.split(r"(?m)^(?=X:)", text)
    header, tunes = parts[0], parts[1:]
    out: list[tuple[str, str]] = []
    for t in tunes:
        m = re.match(r"X:\s*(\S*)", t)
        out.append((m.group(1) if m else str(len(out) + 1), t))
    return header, out


def list_corpus_works(
    limit_per_source: int | None = None, sources: Iterable[str] | None = None
) -> list[Work]:
    """Every work of music21's bundled corpus (or of some collections), in a stable order."""
    wanted = set(sources) if sources is not None else None
    from music21 import corpus

    root = Path(str(corpus.getCorePaths()[0])).parents[0]
    while root.name != "corpus":
        root = root.parent
    works: list[Work] = []
    per_source: Counter[str] = Counter()
    for p in sorted(Path(str(x)) for x in corpus.getCorePaths()):
        rel = p.relative_to(root).as_posix()
        source = rel.split("/")[0]
        ext = p.suffix.lower()
        if ext in _SKIP_EXT or (wanted is not None and source not in wanted):
            continue
        if limit_per_source is not None and per_source[source] >= limit_per_source:
            continue
        if ext == ".abc":
            header, tunes = _split_abc(p.read_text(encoding="latin-1"))
            for x, tune in tunes:
                if limit_per_source is not None and per_source[source] >= limit_per_source:
                    break
                works.append(Work(f"{rel}#{x}", source, "abc", str(p), header + tune))
                per_source[source] += 1
        elif ext in _SCORE_EXT:
            works.append(Work(rel, source, "music21", str(p)))
            per_source[source] += 1
    return works


def list_midi_works(folder: str | Path) -> list[Work]:
    """Every MIDI file below a user's folder (each file is a work)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"MIDI folder not found: {folder}")
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in {".mid", ".midi"}
    )
    return [Work(f"user/{p.relative_to(folder).as_posix()}", "user", "midi", str(p)) for p in files]


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C-level stdout/stderr: symusic's ABC reader prints a line per odd bar."""
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in [*saved, devnull]:
            os.close(fd)


def _music21_to_score(path: str, cache: Path) -> tuple[Any, bool]:
    """A corpus score as a symusic Score, cached as a MIDI file; (score, was_fixed).

    We read music21's flattened, tie-stripped notes straight into symusic instead of
    calling ``score.write('midi')``: writing costs twice as much as parsing (690 vs 330
    us/note measured here) and fails on shared TimeSignature objects and badly formed
    repeats, which this path never touches. Repeats are therefore not expanded.
    """
    import symusic

    if cache.exists():
        return symusic.Score(str(cache)), False
    from music21 import converter, meter, tempo

    parsed = converter.parse(path)
    flat = parsed.stripTies(inPlace=False).flatten()
    tpq = 480
    out = symusic.Score(tpq)
    track = symusic.Track(program=0, is_drum=False, name="merged")
    fixed = False
    for n in flat.notes:
        start = round(float(n.offset) * tpq)
        dur = round(float(n.quarterLength) * tpq)
        if dur <= 0:  # grace notes have no length; give them a sixteenth
            dur = tpq // 4
            fixed = True
        for p in n.pitches:
            track.notes.append(symusic.Note(start, dur, int(p.midi), 90))
    track.notes.sort()
    out.tracks.append(track)
    seen_ts: set[int] = set()
    for ts in flat.getElementsByClass(meter.TimeSignature):
        t = round(float(ts.offset) * tpq)
        if t in seen_ts:
            continue
        seen_ts.add(t)
        out.time_signatures.append(symusic.TimeSignature(t, ts.numerator, ts.denominator))
    for mm in flat.getElementsByClass(tempo.MetronomeMark):
        qpm = mm.getQuarterBPM()
        if qpm:
            out.tempos.append(symusic.Tempo(round(float(mm.offset) * tpq), float(qpm)))
    if not out.tempos:
        out.tempos.append(symusic.Tempo(0, 120.0))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    out.dump_midi(str(tmp))
    tmp.replace(cache)
    return out, fixed


@dataclass
class _Result:
    work: Work
    ids: np.ndarray | None = None
    notes: int = 0
    fixed: bool = False
    error: str | None = None


def _cache_name(work: Work) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", work.id)
    return f"{safe}.mid"


def _convert(work: Work, tok: DivergentTokenizer, cache_dir: Path) -> _Result:
    import symusic

    res = _Result(work)
    try:
        with _quiet_stderr():
            if work.kind == "abc":
                assert work.abc is not None
                score = symusic.Score.from_abc(work.abc)
            elif work.kind == "music21":
                score, res.fixed = _music21_to_score(work.path, cache_dir / _cache_name(work))
            else:
                score = symusic.Score(work.path)
        res.notes = int(score.note_num())
        res.ids = tok.encode_score(score).astype(np.uint16)
    except Exception as e:  # any failure of one work is counted, never fatal to the build
        res.error = f"{type(e).__name__}: {str(e)[:200]}"
    return res


def _worker_init() -> None:
    logging.getLogger("music21").setLevel(logging.ERROR)
    import warnings

    warnings.simplefilter("ignore")


_WORKER_TOK: DivergentTokenizer | None = None


def _convert_in_worker(args: tuple[Work, str]) -> _Result:
    global _WORKER_TOK  # per-process cache of the tokenizer, built once per worker
    if _WORKER_TOK is None:
        _worker_init()
        _WORKER_TOK = build_tokenizer()
    work, cache_dir = args
    return _convert(work, _WORKER_TOK, Path(cache_dir))


@dataclass
class DatasetFiles:
    """Where a built dataset lives."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER_FILE

    def tokens(self, split: str) -> Path:
        return self.root / f"{split}.bin"

    def offsets(self, split: str) -> Path:
        return self.root / f"{split}_offsets.npy"


@dataclass
class BuildSummary:
    works: int = 0
    converted: int = 0
    failed: int = 0
    fixed: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    failures_by_source: dict[str, int] = field(default_factory=dict)
    failure_kinds: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def build_dataset(
    out: str | Path,
    *,
    corpus: bool = True,
    midi_dirs: Iterable[str | Path] = (),
    limit_per_source: int | None = None,
    sources: Iterable[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> BuildSummary:
    """Build the tokenized dataset under ``out`` (see the module docstring)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    files = DatasetFiles(Path(out))
    files.root.mkdir(parents=True, exist_ok=True)
    cache_dir = files.root / "cache" / "midi"
    tok = build_tokenizer()
    works: list[Work] = []
    if corpus:
        works += list_corpus_works(limit_per_source, sources)
    for d in midi_dirs:
        works += list_midi_works(d)
    if not works:
        raise ValueError("nothing to build: no corpus and no MIDI files")

    results: list[_Result] = []
    # music21 works are slow; give them to the pool first so the ABC tail fills gaps.
    order = sorted(range(len(works)), key=lambda i: works[i].kind != "music21")
    n_workers = workers or max(1, min(os.cpu_count() or 1, 8))
    jobs = [(works[i], str(cache_dir)) for i in order]
    bar = tqdm(total=len(jobs), desc="converting", unit="work", disable=not progress)
    if n_workers == 1:
        for j in jobs:
            results.append(_convert_in_worker(j))
            bar.update()
    else:
        with ProcessPoolExecutor(n_workers) as pool:
            for r in pool.map(_convert_in_worker, jobs, chunksize=8):
                results.append(r)
                bar.update()
    bar.close()
    results.sort(key=lambda r: r.work.id)

    summary = BuildSummary(works=len(works))
    fail_src: Counter[str] = Counter()
    fail_kind: Counter[str] = Counter()
    manifest_works: list[dict[str, object]] = []
    chunks: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for r in results:
        if r.ids is None:
            summary.failed += 1
            fail_src[r.work.source] += 1
            fail_kind[(r.error or "?").split(":")[0]] += 1
            manifest_works.append({"id": r.work.id, "source": r.work.source, "error": r.error})
            continue
        summary.converted += 1
        summary.fixed += int(r.fixed)
        split = "val" if is_validation(r.work.id) else "train"
        seq = np.concatenate([[tok.vocab.bos], r.ids.astype(np.int64), [tok.vocab.eos]]).astype(
            np.uint16
        )
        chunks[split].append(seq)
        summary.tokens[split] = summary.tokens.get(split, 0) + len(seq)
        summary.notes[split] = summary.notes.get(split, 0) + r.notes
        manifest_works.append(
            {
                "id": r.work.id,
                "source": r.work.source,
                "split": split,
                "tokens": len(seq),
                "notes": r.notes,
                "fixed": r.fixed,
            }
        )
    for split, parts in chunks.items():
        arr = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
        offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
        arr.tofile(files.tokens(split))
        np.save(files.offsets(split), offsets)
    tok.save(files.tokenizer)
    summary.failures_by_source = dict(fail_src)
    summary.failure_kinds = dict(fail_kind)
    summary.seconds = round(time.perf_counter() - t0, 1)
    manifest = {
        "format": 1,
        "tokenizer_hash": tok.hash,
        "vocab_size": len(tok),
        "val_percent": VAL_PERCENT,
        "split_rule": "sha1(work id) % 100 < val_percent -> val",
        "summary": summary.__dict__,
        "works": manifest_works,
    }
    files.manifest.write_text(json.dumps(manifest, indent=1))
    if summary.tokens.get("train"):
        build_readout_banks(files.root)
    return summary


def build_readout_banks(root: str | Path) -> dict[str, Any]:
    """The copy-rate index and feature reference of a built dataset's training split.

    Written next to the dataset (``copy_index.npz``: a Bloom filter of every 8-note
    pitch-interval n-gram of the training works; ``feature_reference.npz``: the
    training distribution in the readout's feature space); ``divergent export``
    copies both into the model folder, where the live readout uses them.
    """
    from divergent.model.grammar import notes_from_ids
    from divergent.model.readout_build import build_reference_and_index
    from divergent.model.tokenizer import load_tokenizer

    files = DatasetFiles(Path(root))
    tok = load_tokenizer(files.tokenizer)
    v = tok.vocab
    ids, offsets = load_split(root, "train")

    def works() -> Iterator[np.ndarray]:
        for a, b in itertools.pairwise(offsets):
            yield ids[a:b].astype(np.int64)

    def decode(work: np.ndarray) -> tuple[list[Any], float]:
        ts = [v.timesig[int(t)] for t in work[:8] if int(t) in v.timesig]
        num, den = ts[0] if ts else (4, 4)
        return list(notes_from_ids(work, v)), num * 4.0 / den

    t0 = time.perf_counter()
    # 2**25 bits (4 MiB): about 0.2% false positives for ~2M n-grams, a low copy-rate floor
    reference, index = build_reference_and_index(works(), decode, bits=2**25)
    index.save(files.root / COPY_INDEX_FILE)
    reference.save(files.root / FEATURE_REFERENCE_FILE)
    return {
        "copy_index_bytes": (files.root / COPY_INDEX_FILE).stat().st_size,
        "feature_reference_bytes": (files.root / FEATURE_REFERENCE_FILE).stat().st_size,
        "index_false_positive_rate": index.expected_false_positive_rate,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def load_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids as a uint16 memmap, work offsets) of one split of a built dataset."""
    files = DatasetFiles(Path(root))
    if not files.manifest.exists():
        raise FileNotFoundError(f"no dataset at {root}: run `divergent data build` first")
    ids = np.fromfile(files.tokens(split), dtype=np.uint16)
    return ids, np.load(files.offsets(split))


def transpose_ids(ids: np.ndarray, semitones: int, vocab: Vocab) -> np.ndarray | None:
    """Shift every Pitch token by ``semitones``; None if a note would leave the range."""
    if semitones == 0:
        return ids
    lo, hi = int(vocab.pitch_ids[0]), int(vocab.pitch_ids[-1])
    is_pitch = (ids >= lo) & (ids <= hi)
    shifted = ids.astype(np.int64) + semitones * is_pitch
    if np.any(is_pitch & ((shifted < lo) | (shifted > hi))):
        return None
    return shifted.astype(ids.dtype)


def check_tokens(ids: np.ndarray, tok: DivergentTokenizer) -> None:
    """Raise TokenizerError if ids hold values outside the vocabulary."""
    if ids.size and int(ids.max()) >= len(tok):
        raise TokenizerError("token id outside the vocabulary")
