"""The decoder variant and thread count for this host, chosen by a short self-benchmark.

Speed differs between machines of the same kind by more than the variants differ from
each other (issue 13: the same int8 step took 0.15 ms on one Xeon and 0.46 ms on
another), so no choice made on one machine holds everywhere. :func:`choose_decoder`
times one decoder step at a fixed context for each decoder file present (``int8``,
``fp32``) and each thread count allowed, interleaved in rounds so that a burst of load
on a shared machine hits every candidate alike, and keeps the int8 one-thread step (the
default, parity-checked against torch) unless another candidate is clearly faster. In
the same rounds it times a prefill (a played phrase's worth of tokens at once) with each
file, and picks the prefill's file by the same rule: on a CPU without int8 dot products
(AVX2 only) the fp32 file's batched products prefill ~1.7x faster than the int8 file's
while the int8 step stays the faster one, so such a host prefills in fp32 and steps in
int8 on one shared KV cache (``OnnxModel(prefill=...)``); the ``int8dyn`` file, which only
ever prefills (``model.files.PREFILL_PRECISIONS``), races there too: on a CPU with VNNI or
AMX its u8s8 products prefill about twice as fast as either. The
result is cached in a small JSON file under the user's cache directory, keyed by CPU
model, ONNX Runtime version, the decoder files' hash and the request, so it is measured
once per host and model (a few seconds) and read back afterwards.

On ``--device cuda`` nothing is measured: the fp32 decoder runs on the GPU (the int8
one's MatMulNBits is a CPU kernel), and the CPU candidates' timings say nothing there.

Wiring (``serve``; ``model.generate.serving_generator``)::

    choice = choose_decoder(model_dir, "auto", device="cpu")   # --decoder, --device
    model = choice.load(model_dir)   # its variant, threads, device and prefill file
    print(choice.banner())
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np

from divergent.model.files import DECODER_CHOICES, PRECISIONS, PREFILL_PRECISIONS
from divergent.model.runtime import (
    IncrementalDecoder,
    ModelError,
    ModelFiles,
    OnnxModel,
    check_device,
    default_model_dir,
    device_precision,
    session_options,
)

log = logging.getLogger(__name__)

__all__ = [
    "CHOICES",
    "CHOICE_CACHE_FILE",
    "Choice",
    "HostBenchConfig",
    "choose_decoder",
    "cpu_model",
    "default_cache_dir",
    "model_hash",
]

#: what ``choose_decoder`` (and ``--decoder``) accepts: a precision, or "auto"
CHOICES: Final = DECODER_CHOICES
#: the cache file's name under the cache directory
CHOICE_CACHE_FILE: Final = "decoder_choice.json"
# the cache file's layout; another version is ignored (and rewritten)
_CACHE_VERSION: Final = 2  # 2: the prefill's variant too
# the variant kept unless another is clearly faster: the parity-checked serving default
_BASELINE: Final = ("int8", 1)


@dataclass(frozen=True)
class HostBenchConfig:
    """How the self-benchmark measures (defaults: about 1-3 s on a 2-vCPU Xeon VM)."""

    #: tokens already in the KV cache when one step is timed
    context: int = 256
    #: timed steps per candidate and round
    steps: int = 60
    #: rounds, every candidate once per round (interleaved: noise hits all alike)
    rounds: int = 5
    #: untimed steps per candidate before the first round
    warmup: int = 20
    #: most intra-op threads tried; at most half the host's CPUs are ever used, the rest
    #: being left to the audio and OSC threads and the diverged decoder's worker
    max_threads: int = 2
    #: another candidate replaces int8 on one thread only below this fraction of its
    #: time: a smaller gain is within the noise of a shared machine, and more threads
    #: cost CPU that the live path needs (the prefill's variant is chosen by the same)
    margin: float = 0.85
    #: tokens of one timed prefill: a played phrase of about four to eight bars
    prefill_tokens: int = 128
    #: timed prefills per decoder file and round
    prefills: int = 3

    def __post_init__(self) -> None:
        for name in ("context", "steps", "rounds", "max_threads", "prefill_tokens", "prefills"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be at least 0, got {self.warmup}")
        if not 0 < self.margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {self.margin}")


@dataclass(frozen=True)
class Choice:
    """The decoder variant and intra-op threads to serve with, and why."""

    #: a precision of ``model.files.PRECISIONS`` ("int8" or "fp32")
    variant: str
    threads: int
    #: one line for a banner or a bench report
    why: str
    #: per-token p50 in ms at ``context`` per candidate, keyed "variant/threads"
    measured: dict[str, float] = field(default_factory=dict)
    #: what was asked: "auto" or a precision
    requested: str = "auto"
    context: int = 256
    #: read back from the cache (True) or measured now (False)
    cached: bool = False
    #: when it was measured (UTC, ISO 8601)
    measured_at: str = ""
    #: where it runs (``model.files.DEVICE_CHOICES``)
    device: str = "cpu"
    #: the precision that runs prefills (several tokens at once): one of
    #: ``model.files.PRECISIONS`` or ``PREFILL_PRECISIONS``; "" = ``variant``
    prefill: str = ""
    #: ms per prefill of ``HostBenchConfig.prefill_tokens`` tokens (p50), keyed by variant
    prefill_measured: dict[str, float] = field(default_factory=dict)

    @property
    def prefill_variant(self) -> str:
        """The precision of the prefill decoder (``OnnxModel(prefill=...)``)."""
        return self.prefill or self.variant

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load(self, model_dir: str | Path | None = None) -> OnnxModel:
        """The model this choice serves: its variant, threads, device and prefill file."""
        return OnnxModel(
            model_dir,
            precision=self.variant,
            threads=self.threads,
            device=self.device,
            prefill=self.prefill_variant,
        )

    def banner(self) -> str:
        """The serve banner's line: what runs, where, and why."""
        t = "thread" if self.threads == 1 else "threads"
        src = "cached" if self.cached else "measured now"
        if self.device != "cpu":
            src = "not measured"  # the GPU's figures are bench model's, not the CPU race's
        pre = f", prefills {self.prefill_variant}" if self.prefill_variant != self.variant else ""
        return (
            f"decoder {self.variant}{pre} on {self.device}, {self.threads} {t} ({src}): {self.why}"
        )


def default_cache_dir() -> Path:
    """``$DIVERGENT_CACHE``, else ``$XDG_CACHE_HOME/divergent``, else ``~/.cache/divergent``."""
    env = os.environ.get("DIVERGENT_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "divergent"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else what ``platform`` knows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: platform's answer below
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def model_hash(model_dir: Path, variants: tuple[str, ...]) -> str:
    """A short SHA-256 of the decoder files ``variants`` (names and bytes)."""
    files = ModelFiles(model_dir)
    h = hashlib.sha256()
    for v in variants:
        h.update(v.encode())
        h.update(files.decoder(v).read_bytes())
    return h.hexdigest()[:16]


def _cache_key(model_dir: Path, requested: str, variants: tuple[str, ...]) -> str:
    import onnxruntime as ort

    return " | ".join(
        (
            cpu_model(),
            f"{_cpu_count()} cpus",
            f"onnxruntime {ort.__version__}",
            f"model {model_hash(model_dir, variants)}",
            f"decoder {requested}",
        )
    )


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; an unreadable or foreign file counts as empty (and is logged)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring the decoder choice cache %s: %s", path, e)
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        log.warning("ignoring the decoder choice cache %s: another format", path)
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    """Write atomically (another process may be reading); a read-only home is logged."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=1))
        tmp.replace(path)
    except OSError as e:
        log.warning("cannot cache the decoder choice in %s: %s", path, e)


def _from_entry(entry: dict[str, Any]) -> Choice | None:
    try:
        choice = Choice(**{**entry, "cached": True})
    except TypeError as e:
        log.warning("ignoring a decoder choice cache entry: %s", e)
        return None
    if (
        choice.variant not in PRECISIONS
        or choice.prefill_variant not in (*PRECISIONS, *PREFILL_PRECISIONS)
        or (choice.threads < 1)
    ):
        log.warning("ignoring a decoder choice cache entry: %s", entry)
        return None
    return choice


def _session(model_dir: Path, variant: str, threads: int) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(
            str(ModelFiles(model_dir).decoder(variant)),
            session_options(threads),
            providers=["CPUExecutionProvider"],
        )
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise ModelError(f"cannot load the {variant} decoder in {model_dir}: {e}") from e


def _measure(
    model_dir: Path,
    candidates: list[tuple[str, int]],
    cfg: HostBenchConfig,
    prefill: bool,
    prefill_only: tuple[str, ...] = (),
) -> tuple[dict[tuple[str, int], float], dict[str, float], int]:
    """Per-token p50 (ms) of one step per candidate, ms p50 of one prefill per variant
    (one thread; only if ``prefill``: the candidates' files and the ``prefill_only``
    ones), all in the same interleaved rounds, and the context.

    The context is ``cfg.context``, or less for a model whose ``block_size`` is shorter.
    """
    model = OnnxModel(model_dir, precision=candidates[0][0], threads=1, device="cpu")
    ctx = min(cfg.context, model.block_size - 1)
    ids = np.random.default_rng(0).integers(0, model.vocab_size, ctx)
    decs: dict[tuple[str, int], IncrementalDecoder] = {}
    for variant, threads in candidates:
        dec = IncrementalDecoder(model, session=_session(model_dir, variant, threads))
        dec.feed(ids)
        for _ in range(cfg.warmup):
            dec.rewind(ctx)
            dec.feed([5])
        decs[(variant, threads)] = dec
    # a decoder of its own per variant: a prefill restarts the history the step needs
    pre_ids = ids[: min(cfg.prefill_tokens, model.block_size)]
    pre_decs = {
        v: IncrementalDecoder(model, session=decs[(v, t)].session)
        for v, t in candidates
        if prefill and t == 1
    }
    for v in prefill_only if prefill else ():
        pre_decs[v] = IncrementalDecoder(model, session=_session(model_dir, v, 1))
    for dec in pre_decs.values():
        dec.feed(pre_ids)  # untimed: the first run of a new length allocates
    times: dict[tuple[str, int], list[float]] = {c: [] for c in candidates}
    pre_times: dict[str, list[float]] = {v: [] for v in pre_decs}
    for _ in range(cfg.rounds):
        for c, dec in decs.items():
            for _ in range(cfg.steps):
                t = time.perf_counter()
                dec.rewind(ctx)
                dec.feed([5])
                times[c].append(time.perf_counter() - t)
        for v, dec in pre_decs.items():
            for _ in range(cfg.prefills):
                t = time.perf_counter()
                dec.reset()
                dec.feed(pre_ids)
                pre_times[v].append(time.perf_counter() - t)
    steps = {c: float(np.median(ts)) * 1000 for c, ts in times.items()}
    return steps, {v: float(np.median(ts)) * 1000 for v, ts in pre_times.items()}, ctx


def _name(c: tuple[str, int]) -> str:
    return f"{c[0]}/{c[1]}"


def _decide(
    measured: dict[tuple[str, int], float], requested: str, ctx: int, cfg: HostBenchConfig
) -> tuple[tuple[str, int], str]:
    """The candidate to serve with, and why (one line)."""
    fastest = min(measured, key=measured.__getitem__)
    base = _BASELINE if _BASELINE in measured else min(measured, key=lambda c: (c[1], c[0]))
    others = ", ".join(f"{_name(c)} {ms:.3f}" for c, ms in measured.items() if c != fastest)
    at = f"ms/token at context {ctx}"
    asked = f"{requested} asked" if requested != "auto" else "auto"
    if len(measured) == 1:
        return fastest, f"{asked}: {_name(fastest)} {measured[fastest]:.3f} {at} (one candidate)"
    if fastest == base or measured[fastest] >= cfg.margin * measured[base]:
        why = (
            f"{asked}: {_name(base)} {measured[base]:.3f} {at}; nothing else ≥ "
            f"{100 * (1 - cfg.margin):.0f}% faster ({others or 'no other candidate'})"
        )
        return base, why
    why = (
        f"{asked}: {_name(fastest)} {measured[fastest]:.3f} {at}, "
        f"{measured[base] / measured[fastest]:.2f}× {_name(base)} ({others})"
    )
    return fastest, why


def _decide_prefill(
    step_variant: str, measured: dict[str, float], tokens: int, cfg: HostBenchConfig
) -> tuple[str, str]:
    """The variant that runs prefills, and why: the step's own unless another file
    prefills in under ``cfg.margin`` of its time (a second session costs memory)."""
    if step_variant not in measured or len(measured) < 2:
        return step_variant, ""
    fastest = min(measured, key=measured.__getitem__)
    own = measured[step_variant]
    if fastest == step_variant or measured[fastest] >= cfg.margin * own:
        return step_variant, ""
    return fastest, (
        f"; prefills {fastest}: {measured[fastest]:.2f} ms for {tokens} tokens, "
        f"{own / measured[fastest]:.2f}× {step_variant}"
    )


def choose_decoder(
    model_dir: str | Path | None = None,
    choice: str = "auto",
    *,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    config: HostBenchConfig | None = None,
    refresh: bool = False,
) -> Choice:
    """The decoder variant and threads for this host: cached, else measured (seconds).

    ``choice`` "auto" considers every decoder file present; "int8" or "fp32" fixes the
    variant (the thread count is still measured). ``refresh`` measures even when a
    cached choice exists. On ``device`` "cuda" nothing is measured: fp32, one thread
    (for the few nodes ORT keeps on the CPU). Raises ValueError for an unknown
    ``choice``, ModelError when the model folder lacks the decoder asked for, and
    DeviceError (a ModelError) for a device that cannot run it (int8 on cuda, no CUDA
    provider).
    """
    if choice not in CHOICES:
        raise ValueError(f"decoder must be one of {', '.join(CHOICES)}, got {choice!r}")
    cfg = config or HostBenchConfig()
    root = Path(model_dir) if model_dir else default_model_dir()
    files = ModelFiles(root)
    if device != "cpu":
        check_device(device)
        variant = device_precision(files, choice, device)
        files.check(variant)
        return Choice(
            variant=variant,
            threads=1,
            why=f"{device}: the {variant} decoder on the GPU, its KV cache in GPU memory "
            "(the int8 decoder's MatMulNBits is a CPU kernel)",
            requested=choice,
            device=device,
        )
    if choice == "auto":
        variants = tuple(v for v in PRECISIONS if files.decoder(v).exists())
    else:
        variants = (choice,)
    for v in variants:
        files.check(v)
    if not variants:
        raise ModelError(f"model folder {root} has no decoder")
    # "auto" only: a variant asked for runs steps and prefills alike
    prefill_only = tuple(
        v for v in PREFILL_PRECISIONS if choice == "auto" and files.decoder(v).exists()
    )
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / CHOICE_CACHE_FILE
    key = _cache_key(root, choice, variants + prefill_only)
    entries = _read_cache(path)
    if not refresh and key in entries:
        cached = _from_entry(entries[key])
        present = set(variants + prefill_only)
        if cached is not None and {cached.variant, cached.prefill_variant} <= present:
            return cached
    max_threads = max(1, min(cfg.max_threads, _cpu_count() // 2))
    candidates = [(v, t) for v in variants for t in range(1, max_threads + 1)]
    measured, pre_measured, ctx = _measure(
        root, candidates, cfg, prefill=choice == "auto", prefill_only=prefill_only
    )
    (variant, threads), why = _decide(measured, choice, ctx, cfg)
    prefill, pre_why = _decide_prefill(variant, pre_measured, cfg.prefill_tokens, cfg)
    why += f"{pre_why}; threads tried: 1-{max_threads} of {_cpu_count()} CPUs"
    result = Choice(
        variant=variant,
        threads=threads,
        why=why,
        prefill=prefill,
        prefill_measured={v: round(ms, 3) for v, ms in pre_measured.items()},
        measured={_name(c): round(ms, 4) for c, ms in measured.items()},
        requested=choice,
        context=ctx,
        cached=False,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    entries[key] = {k: v for k, v in result.to_dict().items() if k != "cached"}
    _write_cache(path, entries)
    return result
