"""The serving runtime: ONNX Runtime sessions and an incremental decoder (no torch).

- :class:`ModelFiles` knows the layout of a model folder (``model/bundled`` by default)
  and checks it is complete and consistent.
- :class:`OnnxModel` holds the ONNX Runtime sessions (the int8 or fp32 decoder step and
  the latent encoder) and the tokenizer, on a device (``model.files.DEVICE_CHOICES``):
  the CPU, or ``cuda`` through the CUDA provider of the ``onnxruntime-gpu`` build. A
  device that cannot run the model is refused with a :class:`DeviceError` when the model
  is loaded, never a silent fall-back to the CPU (:func:`check_device` says so before
  anything is loaded; the sessions are then checked node by node).
- :class:`IncrementalDecoder` is the streaming interface: ``reset`` / ``feed`` tokens
  (prefill or one step, with the KV cache kept between calls) / ``logits``. Sampling and
  grammar live in ``model.grammar`` and are driven by ``model.generate``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from divergent.model.files import (
    CONFIG_FILE,
    DEVICE_CHOICES,
    DIVERGED_DECODER_FILE,
    ENCODER_FILE,
    PREFILL_PRECISIONS,
    TOKENIZER_FILE,
    decoder_file,
    diverged_file,
)
from divergent.model.tokenizer import DivergentTokenizer, load_tokenizer

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FORMAT",
    "CPU_PROVIDER",
    "CUDA_PROVIDER",
    "DeviceError",
    "IncrementalDecoder",
    "ModelError",
    "ModelFiles",
    "OnnxModel",
    "check_device",
    "default_model_dir",
    "device_precision",
    "off_device",
    "profile_placement",
    "providers",
    "session_device",
    "session_options",
]


# the config format this runtime reads (2: GroupQueryAttention step, shared KV buffer)
CONFIG_FORMAT = 2


class ModelError(RuntimeError):
    """A model folder that is missing, incomplete or inconsistent."""


class DeviceError(ModelError):
    """The device asked for cannot run the model here (no CUDA provider, no GPU, a node
    the GPU would not run): refused when the model loads, never a silent fall-back."""


CPU_PROVIDER: Final = "CPUExecutionProvider"
CUDA_PROVIDER: Final = "CUDAExecutionProvider"
# The ops that carry a step's compute. On cuda, one of these placed on the CPU (the CUDA
# provider has no kernel for it with the model's types) refuses the device: it would
# copy activations (and the KV cache) across the bus at every step behind the user's
# back. Shape bookkeeping (Shape, Gather of ids, Slice...) may stay on the CPU: ORT puts
# it there on purpose.
_COMPUTE_OPS: Final = frozenset(
    {
        "Attention",
        "FastGelu",
        "FusedMatMul",
        "Gelu",
        "Gemm",
        "GroupQueryAttention",
        "LayerNormalization",
        "MatMul",
        "MatMulNBits",
        "MultiHeadAttention",
        "SkipLayerNormalization",
    }
)
_GPU_BUILD_HINT: Final = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"


def default_model_dir() -> Path:
    """The model bundled with the package (``model/bundled``), or ``$DIVERGENT_MODEL``."""
    env = os.environ.get("DIVERGENT_MODEL")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "bundled"


@dataclass(frozen=True)
class ModelFiles:
    """Paths in a model folder (names from ``model.files``), and its completeness check."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER_FILE

    @property
    def encoder(self) -> Path:
        return self.root / ENCODER_FILE

    @property
    def diverged(self) -> Path:
        """The BAD-tuned decoder (int8) behind the divergence knob, when shipped."""
        return self.root / DIVERGED_DECODER_FILE

    def diverged_twin(self, precision: str) -> Path | None:
        """The BAD-tuned decoder's prefill-only twin in ``precision`` (None: there is no
        such twin for that precision; the path may not exist in an older folder)."""
        if precision not in PREFILL_PRECISIONS:
            return None
        return self.root / diverged_file(precision)

    def decoder(self, precision: str) -> Path:
        """The decoder step in ``precision``; ModelError for one never exported."""
        try:
            return self.root / decoder_file(precision)
        except ValueError as e:
            raise ModelError(str(e)) from e

    def check(self, precision: str = "int8") -> dict[str, Any]:
        """The parsed config, after checking the folder has what the runtime needs."""
        for p in (self.config, self.tokenizer, self.encoder, self.decoder(precision)):
            if not p.exists():
                raise ModelError(f"model folder {self.root} is missing {p.name}")
        try:
            cfg: dict[str, Any] = json.loads(self.config.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{self.config}: not valid JSON: {e}") from e
        if "model" not in cfg or "io" not in cfg:
            raise ModelError(f"{self.config}: not a divergent model config")
        if cfg.get("format") != CONFIG_FORMAT:
            raise ModelError(
                f"{self.config}: model format {cfg.get('format')}, this runtime reads format "
                f"{CONFIG_FORMAT}: re-export the checkpoint with `divergent export`"
            )
        return cfg


def check_device(device: str) -> None:
    """Refuse a device this ONNX Runtime cannot use, before anything is loaded or opened.

    ``cpu`` always works. ``cuda`` needs the CUDA provider, which only the GPU build
    (``onnxruntime-gpu``) has; without it this raises a one-line :class:`DeviceError`
    naming what to install. (Whether the GPU then really runs the model is checked when
    the sessions are made: :class:`OnnxModel`.)
    """
    if device not in DEVICE_CHOICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {device!r}")
    if device == "cpu":
        return
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if CUDA_PROVIDER not in avail:
        raise DeviceError(
            f"--device cuda: this ONNX Runtime (onnxruntime {ort.__version__}) has no "
            f"{CUDA_PROVIDER} (it has {', '.join(avail) or 'none'}); install its GPU "
            f"build: {_GPU_BUILD_HINT} (and an NVIDIA GPU with its driver), or use "
            "--device cpu"
        )


def providers(device: str = "cpu") -> list[str]:
    """The execution providers of ``device``'s sessions: CUDA then CPU (for the shape
    bookkeeping ORT keeps on the CPU on purpose; compute there is refused, see
    :class:`OnnxModel`), or CPU alone. Raises :class:`DeviceError` (:func:`check_device`)."""
    check_device(device)
    return [CUDA_PROVIDER, CPU_PROVIDER] if device == "cuda" else [CPU_PROVIDER]


def device_precision(files: ModelFiles, precision: str, device: str) -> str:
    """The decoder precision that runs on ``device`` for ``precision`` ("auto", "int8",
    "fp32"). On the CPU, auto is int8 (8-bit blockwise weights, int8 compute: the fast
    path there). On cuda it is fp32: the int8 decoder's MatMulNBits (accuracy level 4,
    int8 compute) is a CPU kernel, so most of every step would run on the CPU; int8
    asked for explicitly is refused (DeviceError), as is a folder without fp32."""
    if device != "cuda":
        return "int8" if precision == "auto" else precision
    if precision == "int8":
        raise DeviceError(
            "--device cuda runs the fp32 decoder: the int8 one's MatMulNBits (int8 "
            "compute) is a CPU kernel; use --decoder fp32 (or auto) with --device cuda"
        )
    if not files.decoder("fp32").exists():
        raise DeviceError(
            f"--device cuda needs the fp32 decoder, which {files.root} lacks "
            "(re-export the model with `divergent export`)"
        )
    return "fp32"


def session_device(session: Any) -> tuple[str, int]:
    """Where ``session`` runs: ("cuda", device id) when its first provider is CUDA, else
    ("cpu", 0). Decides where an :class:`IncrementalDecoder` binds its KV cache."""
    names = session.get_providers()
    if names and names[0] == CUDA_PROVIDER:
        options = session.get_provider_options().get(CUDA_PROVIDER, {})
        return "cuda", int(options.get("device_id", 0))
    return "cpu", 0


def profile_placement(path: str | Path) -> dict[str, tuple[str, str]]:
    """Which provider ran each node in an ONNX Runtime profile (``end_profiling()``'s
    file): node name -> (op type, provider)."""
    events = json.loads(Path(path).read_text())
    placed: dict[str, tuple[str, str]] = {}
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") == "Node" and "op_name" in args and "provider" in args:
            name = str(ev.get("name", "")).removesuffix("_kernel_time")
            placed[name] = (str(args["op_name"]), str(args["provider"]))
    return placed


def off_device(placement: dict[str, tuple[str, str]], provider: str) -> Counter[str]:
    """The compute ops (by type, counted) that ran on another provider than ``provider``."""
    return Counter(op for op, ran in placement.values() if op in _COMPUTE_OPS and ran != provider)


def _profiled(so: Any, role: str) -> Any:
    """``so`` with profiling on, written to the temp folder (one file per session)."""
    so.enable_profiling = True
    # an absolute prefix: the profile goes to the temp folder, not the working directory
    so.profile_file_prefix = str(
        Path(tempfile.gettempdir()) / f"divergent-placement-{role}-{os.getpid()}"
    )
    return so


def _np_type(onnx_type: str) -> Any:
    """numpy's dtype for an ONNX Runtime tensor type ("tensor(float)" -> float32)."""
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(onnx_type, np.float32)


def _input_type(session: Any, name: str) -> Any:
    return _np_type(next(i.type for i in session.get_inputs() if i.name == name))


def no_cpu_arena(so: Any) -> Any:
    """Turn ONNX Runtime's CPU arena off in ``so`` and return it.

    Why: the arena keeps every region it ever grew, and a prefill's buffers follow the
    prompt's length, so prompts of changing lengths fragmented it and it grew in steps
    over a set (one arena shared by every session still grew +3 to +5 MB over the first
    few hundred answers, whatever its settings). Without it each buffer is malloc'd and
    freed per call; the server maps large blocks on their own (``server.heap``), so
    they leave nothing behind. Measured side by side in one process (a 2-vCPU AMD EPYC,
    80 prefills of 16–380 tokens with 40 steps after each): prefill and step within 4 %
    either way.
    """
    so.enable_cpu_mem_arena = False
    return so


def session_options(threads: int = 1) -> Any:
    """ONNX Runtime session options for a decoder (or encoder) on ``threads`` intra-op threads.

    One declaration for every session of the serving path (``OnnxModel``, the host
    self-benchmark of ``model.host``), so what is measured is what is served.
    """
    import onnxruntime as ort

    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    so = ort.SessionOptions()
    # One intra-op thread was stable here; two varied 2x between processes on 2 vCPUs:
    # model.host measures per host whether more threads pay. With more than one, the
    # pool spins between ops (ORT's default): measured on a 2-vCPU Xeon, two threads
    # without spinning were no faster than one (0.79 vs 0.80 ms at context 256), with it
    # 0.63 ms.
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No memory patterns: ORT keeps one allocation plan per distinct set of input shapes
    # for the session's life, and a prefill's length (1 to block_size new tokens) is a
    # new shape until every length has been seen, on every decoder. Found in a soak
    # (heaptrack, gdb): ~1.6 KB kept after each prefill of a new length, ~0.7 a second,
    # the steady part of the server's memory growth. The step (one token) was as fast
    # without them, within 5 %, measured interleaved on a 2-vCPU AMD EPYC; prefills too.
    so.enable_mem_pattern = False
    return no_cpu_arena(so)


class OnnxModel:
    """The exported model: decoder step + latent encoder + tokenizer."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        precision: str = "auto",
        threads: int = 1,
        device: str = "cpu",
        prefill: str | None = None,
    ) -> None:
        """``prefill``: the decoder precision that runs feeds of several tokens (prefills,
        chunks) in :class:`IncrementalDecoder`; None, the same as ``precision``. On a CPU
        without int8 dot products (AVX2 only) the fp32 file's batched products run a
        prefill ~1.7x faster than the int8 file's, while the int8 step stays the faster
        one-token path; on one with VNNI/AMX the ``int8dyn`` file (prefills only,
        ``model.files.PREFILL_PRECISIONS``) runs it about 2x faster than either;
        ``model.host`` measures which pair a host serves with."""
        import onnxruntime as ort

        self.files = ModelFiles(Path(model_dir) if model_dir else default_model_dir())
        # CPU unless asked: a model this small answers fastest on one CPU thread; cuda
        # is for hosts whose CPU is busy or slow, and is refused where it cannot run
        prov = providers(device)
        if precision in PREFILL_PRECISIONS:
            raise ModelError(
                f"the {precision} decoder only prefills (as a step decoder it misses the "
                f"98% top-1 gate): use prefill={precision!r} beside an int8 or fp32 step"
            )
        precision = device_precision(self.files, precision, device)
        prefill = precision if prefill is None else prefill
        if prefill != precision:
            if device != "cpu":
                raise DeviceError(
                    f"--device {device} runs one decoder ({precision}) for steps and "
                    f"prefills alike; a {prefill} prefill is a CPU option"
                )
            self.files.check(prefill)
        cfg = self.files.check(precision)
        self.config = cfg
        m = cfg["model"]
        self.vocab_size = int(m["vocab_size"])
        self.block_size = int(m["block_size"])
        self.n_layer = int(m["n_layer"])
        self.n_head = int(m["n_head"])
        self.head_size = int(m["n_embd"]) // self.n_head
        self.z_dim = int(m["z_dim"])
        self.past_names: list[str] = list(cfg["io"]["past_names"])
        self.present_names: list[str] = list(cfg["io"]["present_names"])
        self.tokenizer: DivergentTokenizer = load_tokenizer(self.files.tokenizer)
        if self.tokenizer.hash != cfg.get("tokenizer_hash"):
            raise ModelError(f"{TOKENIZER_FILE} does not match the model's config")
        so = session_options(threads)
        # on cuda the first calls are profiled: which provider ran each node (checked below)
        cuda = device == "cuda"
        dec_so = _profiled(session_options(threads), "decoder") if cuda else so
        enc_so = _profiled(session_options(threads), "encoder") if cuda else so
        try:
            self.decoder = ort.InferenceSession(
                str(self.files.decoder(precision)), dec_so, providers=prov
            )
            self.encoder = ort.InferenceSession(str(self.files.encoder), enc_so, providers=prov)
            # the BAD-tuned decoder the divergence knob mixes in (model.divergence); it is
            # shipped in int8 only, whose MatMulNBits is a CPU kernel: on the CPU always
            # (on its own worker thread, beside a decoder on the GPU)
            self.diverged = (
                ort.InferenceSession(str(self.files.diverged), so, providers=[CPU_PROVIDER])
                if self.files.diverged.exists()
                else None
            )
            # the KV cache is shared: the prefill decoder writes it, the step decoder
            # reads it on (both files keep it in float32 as exported; checked below)
            self.prefill_decoder = (
                self.decoder
                if prefill == precision
                else ort.InferenceSession(str(self.files.decoder(prefill)), so, providers=prov)
            )
            # the diverged decoder's prefills: on its twin in the prefill's precision where
            # one is shipped (its weights are in no other file), else on itself
            twin = self.files.diverged_twin(prefill)
            self.diverged_prefill = (
                ort.InferenceSession(str(twin), so, providers=[CPU_PROVIDER])
                if self.diverged is not None and twin is not None and twin.exists()
                else self.diverged
            )
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise ModelError(f"cannot load the ONNX model in {self.files.root}: {e}") from e
        self.precision = precision
        self.prefill_precision = prefill
        self.device = device
        # the KV cache's element type: the decoder's past inputs' (float32 as exported)
        self.cache_type = _input_type(self.decoder, self.past_names[0])
        self._check_cache_types()
        self.output_names = ["logits", *self.present_names]
        if device == "cuda":
            self._check_on_gpu()

    def _check_cache_types(self) -> None:
        """Every session that writes or reads a KV cache keeps it in the step decoder's
        type (float32 as exported): one session's cache is continued by another (the
        prefill's by the step's, the diverged twin's by the diverged decoder), so a
        mismatched file (hand-made, or from another export) is refused at load with its
        name rather than failing inside the first answer that reaches it."""
        sessions = (
            (self.files.decoder(self.prefill_precision), self.prefill_decoder),
            (self.files.diverged, self.diverged),
            (self.files.diverged_twin(self.prefill_precision), self.diverged_prefill),
        )
        want = np.dtype(self.cache_type).name
        # a session standing in for another (the step decoder prefilling, the diverged
        # decoder without a twin) is checked again: the same answer, no special case
        for path, session in sessions:
            if session is None:
                continue
            got = np.dtype(_input_type(session, self.past_names[0])).name
            if got != want:
                name = path.name if path is not None else "a decoder"
                raise ModelError(
                    f"{name} keeps its KV cache in {got}, the {self.precision} decoder in "
                    f"{want}: one cannot continue the other's cache"
                )

    def _check_on_gpu(self) -> None:
        """The sessions really run on the GPU: CUDA is their first provider (ORT falls
        back to the CPU quietly when the CUDA libraries or the GPU are missing), and one
        profiled call of each placed every compute node on it. Raises DeviceError."""
        import onnxruntime as ort

        sessions = (("decoder", self.decoder), ("encoder", self.encoder))
        failed: Exception | None = None
        off: Counter[str] = Counter()
        try:
            for role, session in sessions:
                first = session.get_providers()[0]
                if first != CUDA_PROVIDER:
                    raise DeviceError(
                        f"--device cuda: ONNX Runtime could not start the CUDA provider for "
                        f"the {role} (it would run on {first}): no usable NVIDIA GPU, or the "
                        f"CUDA and cuDNN libraries onnxruntime-gpu {ort.__version__} needs "
                        "are missing; refused rather than run on the CPU (use --device cpu)"
                    )
            # one call of each, profiled: the profile says which provider ran every node
            try:
                self.logits(np.array([[self.tokenizer.vocab.bos]]), np.zeros((1, self.z_dim)))
                self.encode(np.array([self.tokenizer.vocab.bos, self.tokenizer.vocab.bar]))
            except Exception as e:  # ORT raises its own types (Fail, RuntimeException, ...)
                failed = e
        finally:
            # always ended (profiling stops) and removed, refused or not: no file is left
            for _, session in sessions:
                path = Path(session.end_profiling())
                try:
                    if failed is None:
                        off += off_device(profile_placement(path), CUDA_PROVIDER)
                except (OSError, ValueError) as e:  # an unreadable profile proves nothing
                    failed = e
                finally:
                    path.unlink(missing_ok=True)
        if failed is not None:
            raise DeviceError(
                f"--device cuda: the first call on the GPU failed, or where it ran cannot "
                f"be told ({type(failed).__name__}: {' '.join(str(failed).split())}); "
                "refused (use --device cpu)"
            ) from failed
        if off:
            ops = ", ".join(f"{op} x{n}" for op, n in sorted(off.items()))
            # the known case: ORT's CUDA GroupQueryAttention is fp16/bf16 only
            why = (
                f"; its CUDA GroupQueryAttention takes fp16/bf16, this decoder's cache is "
                f"{np.dtype(self.cache_type).name}"
                if "GroupQueryAttention" in off
                else ""
            )
            raise DeviceError(
                f"--device cuda: ONNX Runtime {ort.__version__}'s CUDA provider has no "
                f"kernel for part of this model ({ops}{why}): those nodes would run on the "
                "CPU, the KV cache crossing the bus every step; refused rather than a "
                "silent fall-back (use --device cpu)"
            )

    def encode(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior (mu, logvar), each (z_dim,), of a phrase of token ids."""
        x = np.asarray(ids, dtype=np.int64)[None, :]
        if x.shape[1] == 0:
            return np.zeros(self.z_dim, np.float32), np.zeros(self.z_dim, np.float32)
        mu, logvar = self.encoder.run(None, {"input_ids": x, "mask": np.ones(x.shape, np.float32)})
        return mu[0], logvar[0]

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zero-length past tensors: a decoder call that starts from nothing."""
        shape = (batch, self.n_head, 0, self.head_size)
        return {n: np.zeros(shape, self.cache_type) for n in self.past_names}

    def logits(self, ids: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Logits (B, T, V) of whole windows ``ids`` (B, T) under latents ``z`` (B, z_dim).

        One stateless call from an empty cache (scoring, evaluation); streaming uses
        :class:`IncrementalDecoder`.
        """
        x = np.ascontiguousarray(ids, dtype=np.int64)
        B, T = x.shape
        if self.block_size < T:
            raise ValueError(f"{T} tokens exceed the model's block_size {self.block_size}")
        feed: dict[str, np.ndarray] = {
            "input_ids": x,
            "z": np.ascontiguousarray(z, dtype=_input_type(self.decoder, "z")).reshape(
                B, self.z_dim
            ),
            "seqlens_k": np.full((B,), T - 1, np.int32),
            "total_sequence_length": np.array(T, np.int32),
        }
        feed.update(self.empty_cache(B))
        return np.asarray(self.decoder.run(["logits"], feed)[0])

    def with_decoder_initializers(self, arrays: dict[str, np.ndarray]) -> OnnxModel:
        """A shallow copy whose decoder session replaces the named initializers.

        Used by concepts (``model.concept``): ``SessionOptions.add_initializer`` swaps
        weights (MatMulNBits packed ones included) at session creation, so the same
        graph file serves every concept. The copy shares the tokenizer and encoder.
        """
        import copy

        import onnxruntime as ort

        old = self.decoder.get_session_options()
        so = ort.SessionOptions()
        so.intra_op_num_threads = old.intra_op_num_threads
        so.inter_op_num_threads = old.inter_op_num_threads
        so.log_severity_level = old.log_severity_level
        so.graph_optimization_level = old.graph_optimization_level
        so.enable_mem_pattern = old.enable_mem_pattern
        so.enable_cpu_mem_arena = old.enable_cpu_mem_arena
        # ORT reads the buffers during the session's life: the copy keeps them
        values = {
            n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for n, a in arrays.items()
        }
        for name, value in values.items():
            so.add_initializer(name, value)
        try:
            session = ort.InferenceSession(
                str(self.files.decoder(self.precision)), so, providers=self.decoder.get_providers()
            )
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise ModelError(f"cannot rebuild the decoder with new weights: {e}") from e
        other = copy.copy(self)
        other.decoder = session
        # the new weights are in this session only: it runs the copy's prefills too
        other.prefill_decoder = session
        other.prefill_precision = self.precision
        # the BAD-tuned decoder does not carry these weights: mixing it with a decoder
        # that does would blend two different models, so the copy's knob goes without it
        # (latent push, contrastive tokens and bounds still act)
        other.diverged = None
        other.diverged_prefill = None
        other._initializer_values = values  # type: ignore[attr-defined]
        return other


class IncrementalDecoder:
    """Feed tokens, read the next-token logits; the KV cache lives between calls.

    With ``batch`` > 1 every row shares the same token history but has its own latent
    (``set_z`` takes (batch, z_dim)): one ONNX call decodes, e.g., the steered answer and
    the base model's view of it side by side, for an exact surprisal readout.

    The cache is preallocated, one (batch, heads, block_size, head_size) buffer per layer
    and per K/V, bound as both the ``past`` input and the ``present`` output of every call
    (ONNX Runtime IO binding): GroupQueryAttention writes the new tokens' K/V in place, so
    a step never copies the cache. A one-token step (the hot path) runs on a binding whose
    inputs and logits are fixed numpy buffers: nothing is allocated per token.

    Several tokens at once (a prefill, a chunk on the history) run on the model's
    ``prefill_decoder``, whose IO binding holds the same cache buffers: on a host that
    prefills in fp32 and steps in int8 the fp32 file writes the cache and the int8 file
    reads it on (a concept decoder prefills on its own session; the diverged decoder on
    its prefill-only twin where the model prefills on that kind of file and one is
    shipped, ``OnnxModel.diverged_prefill``, else on its own session).

    When the context reaches the model's ``block_size``, the last ``keep`` tokens are
    re-fed as a fresh prefill (positions restart), so a live stream never stops.

    On a session that runs on the GPU (``--device cuda``) the cache buffers are allocated
    in the GPU's memory and bound there: GroupQueryAttention updates them in place and
    they never cross the bus; only the token, the lengths, the latent (in) and the
    logits (out) do, a few kilobytes a step.
    """

    def __init__(
        self,
        model: OnnxModel,
        *,
        z: np.ndarray | None = None,
        keep: int = 384,
        batch: int = 1,
        session: Any = None,
        prefill_session: Any = None,
    ) -> None:
        import onnxruntime as ort

        self.model = model
        # another decoder of the same shape (the diverged one), or the model's own
        self.session = session if session is not None else model.decoder
        # several tokens at once (prefills, chunks): the one given (the diverged decoder's
        # twin), else the model's prefill decoder when this runs the model's own weights,
        # else the same session
        if prefill_session is None:
            prefill_session = model.prefill_decoder if session is None else session
        self.prefill_session = prefill_session
        self.batch = batch
        self.keep = min(keep, model.block_size // 2)
        B = batch
        shape = (B, model.n_head, model.block_size, model.head_size)
        self.device, device_id = session_device(self.session)
        cache_type = _input_type(self.session, model.past_names[0])
        self._z = np.zeros((B, model.z_dim), _input_type(self.session, "z"))
        self._ids1 = np.zeros((B, 1), np.int64)
        self._seqlens = np.zeros((B,), np.int32)
        self._total = np.zeros((), np.int32)
        logits_type = _np_type(self.session.get_outputs()[0].type)
        self._logits1 = np.zeros((B, 1, model.vocab_size), logits_type)
        as_value = ort.OrtValue.ortvalue_from_numpy  # wraps the numpy memory, no copy
        fixed = {"z": self._z, "seqlens_k": self._seqlens, "total_sequence_length": self._total}
        values = {name: as_value(a) for name, a in fixed.items()}
        for name in model.past_names:
            if self.device == "cuda":
                # in the GPU's memory (zeroed once, copied there at creation): bound as
                # past and present, the cache stays on the device for the decoder's life
                values[name] = ort.OrtValue.ortvalue_from_numpy(
                    np.zeros(shape, cache_type), "cuda", device_id
                )
            else:
                # written once here: np.zeros maps untouched pages that become resident
                # only as the context first grows into them, which showed as RSS growth
                # across a set (about 10 MB per generator over its first long answers)
                buf = np.empty(shape, cache_type)
                buf.fill(0)
                values[name] = as_value(buf)
        # kept for the decoder's life: the bindings point into these buffers (a CPU
        # OrtValue made from numpy holds the array only through this Python object)
        self._bound = values
        # the general binding (prefill, several tokens): ids and logits bound per call
        self._io = self.prefill_session.io_binding()
        self._io.bind_output("logits")  # first, so get_outputs()[0] is the logits
        # the one-token binding: everything fixed
        self._io1 = self.session.io_binding()
        self._io1.bind_ortvalue_input("input_ids", as_value(self._ids1))
        self._io1.bind_ortvalue_output("logits", as_value(self._logits1))
        for io in (self._io, self._io1):
            for name, value in values.items():
                io.bind_ortvalue_input(name, value)
            for past, present in zip(model.past_names, model.present_names, strict=True):
                io.bind_ortvalue_output(present, values[past])
        if z is not None:
            self.set_z(z)
        self.reset()

    def reset(self) -> None:
        """Forget the history (the buffers are reused: only the length restarts)."""
        self.tokens: list[int] = []
        self.last_logits_all = np.zeros((self.batch, self.model.vocab_size), np.float32)
        self.last_logits = self.last_logits_all[0]

    def rewind(self, n: int) -> None:
        """Keep only the first ``n`` tokens of the history (their cache stays valid)."""
        if not 0 <= n <= len(self.tokens):
            raise ValueError(f"cannot rewind to {n} of {len(self.tokens)} tokens")
        del self.tokens[n:]

    @property
    def z(self) -> np.ndarray:
        return self._z[0].copy()

    def set_z(self, z: np.ndarray) -> None:
        """Change the latent(s); acts from the next fed token on (the cache is kept)."""
        z = np.asarray(z, dtype=np.float32)
        z = np.broadcast_to(z.reshape(-1, z.shape[-1]), (self.batch, z.shape[-1]))
        if z.shape[1] != self.model.z_dim:
            raise ValueError(f"z must have {self.model.z_dim} values, got {z.shape[1]}")
        self._z[...] = z  # in place: the bound input reads this buffer

    def _step(self, tok: int, past: int) -> np.ndarray:
        """One token on a history of ``past`` tokens: the hot path, nothing allocated."""
        self._seqlens[...] = past
        self._total[...] = past + 1
        self._ids1[...] = tok
        self.session.run_with_iobinding(self._io1)
        return self._logits1  # (B, 1, V), overwritten by the next step

    def _run(self, toks: list[int]) -> np.ndarray:
        past = len(self.tokens)
        total = past + len(toks)
        if len(toks) > 1 and past and self.batch > 1:
            # ORT's CPU GroupQueryAttention takes several new tokens on top of a history
            # for batch 1 only: one step per token here (rare: prefills start from reset)
            out = np.empty((self.batch, len(toks), self.model.vocab_size), np.float32)
            for i, t in enumerate(toks):
                out[:, i] = self._step(t, past + i)[:, 0]
            return out
        if len(toks) == 1:
            return self._step(toks[0], past)
        self._seqlens[...] = total - 1
        self._total[...] = total
        ids = np.ascontiguousarray(
            np.broadcast_to(np.asarray(toks, dtype=np.int64), (self.batch, len(toks)))
        )
        self._io.bind_cpu_input("input_ids", ids)
        self._io.bind_output("logits")  # unallocated: its length changes between calls
        self.prefill_session.run_with_iobinding(self._io)
        return np.asarray(self._io.get_outputs()[0].numpy())  # (B, T, V)

    def feed(self, tokens: list[int] | np.ndarray, *, all_logits: bool = False) -> np.ndarray:
        """Append tokens; returns row 0's logits after the last one (V,), or (T, V) if asked.

        ``last_logits_all`` holds every row's (B, V) logits after the call.
        """
        toks = [int(t) for t in tokens]
        if not toks:
            return self.last_logits
        if len(self.tokens) + len(toks) > self.model.block_size:
            history = (self.tokens + toks)[-self.keep :]
            self.reset()
            toks = history
        logits = self._run(toks)
        self.tokens.extend(toks)
        # a copy (as float32 whatever the model computes in): the one-token path
        # overwrites its logits buffer on the next step
        self.last_logits_all = logits[:, -1].astype(np.float32)
        self.last_logits = self.last_logits_all[0]
        return logits[0].astype(np.float32) if all_logits else self.last_logits
