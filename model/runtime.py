"""The serving runtime: ONNX Runtime sessions and an incremental decoder (no torch).

- :class:`ModelFiles` knows the layout of a model folder (``model/bundled`` by default)
  and checks it is complete and consistent.
- :class:`OnnxModel` holds the ONNX Runtime sessions (the int8 or fp32 decoder step and
  the latent encoder) and the tokenizer. Providers are chosen at run time: CUDA when the
  installed ONNX Runtime offers it (the ``onnxruntime-gpu`` build), else CPU.
- :class:`IncrementalDecoder` is the streaming interface: ``reset`` / ``feed`` tokens
  (prefill or one step, with the KV cache kept between calls) / ``logits``. Sampling and
  grammar live in ``model.grammar`` and are driven by ``model.generate``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from divergent.model.files import (
    CONFIG_FILE,
    DIVERGED_DECODER_FILE,
    ENCODER_FILE,
    TOKENIZER_FILE,
    decoder_file,
)
from divergent.model.tokenizer import DivergentTokenizer, load_tokenizer

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FORMAT",
    "IncrementalDecoder",
    "ModelError",
    "ModelFiles",
    "OnnxModel",
    "default_model_dir",
    "providers",
    "session_options",
]


# the config format this runtime reads (2: GroupQueryAttention step, shared KV buffer)
CONFIG_FORMAT = 2


class ModelError(RuntimeError):
    """A model folder that is missing, incomplete or inconsistent."""


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


def providers() -> list[str]:
    """CUDA first when this ONNX Runtime build has it (onnxruntime-gpu), then CPU."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    chosen = [p for p in ("CUDAExecutionProvider",) if p in avail]
    return [*chosen, "CPUExecutionProvider"]


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
    return so


class OnnxModel:
    """The exported model: decoder step + latent encoder + tokenizer."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        precision: str = "auto",
        threads: int = 1,
        device: str = "auto",
    ) -> None:
        import onnxruntime as ort

        self.files = ModelFiles(Path(model_dir) if model_dir else default_model_dir())
        # CPU unless asked: the decoder's in-place KV cache (GroupQueryAttention sharing
        # one buffer for past and present, bound in host memory) is a CPU path, and a
        # model this small answers faster on one CPU thread than through a GPU round trip
        prov = providers() if device == "cuda" else ["CPUExecutionProvider"]
        if precision == "auto":
            # int8 (8-bit blockwise weights, int8 compute) is the fast path on CPU
            on_gpu = prov[0] == "CUDAExecutionProvider"
            precision = "fp32" if on_gpu and self.files.decoder("fp32").exists() else "int8"
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
        try:
            self.decoder = ort.InferenceSession(
                str(self.files.decoder(precision)), so, providers=prov
            )
            self.encoder = ort.InferenceSession(str(self.files.encoder), so, providers=prov)
            # the BAD-tuned decoder the divergence knob mixes in (model.divergence)
            self.diverged = (
                ort.InferenceSession(str(self.files.diverged), so, providers=prov)
                if self.files.diverged.exists()
                else None
            )
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise ModelError(f"cannot load the ONNX model in {self.files.root}: {e}") from e
        self.precision = precision
        self.output_names = ["logits", *self.present_names]

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
        return {n: np.zeros(shape, np.float32) for n in self.past_names}

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
            "z": np.ascontiguousarray(z, dtype=np.float32).reshape(B, self.z_dim),
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
        # the BAD-tuned decoder does not carry these weights: mixing it with a decoder
        # that does would blend two different models, so the copy's knob goes without it
        # (latent push, contrastive tokens and bounds still act)
        other.diverged = None
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

    When the context reaches the model's ``block_size``, the last ``keep`` tokens are
    re-fed as a fresh prefill (positions restart), so a live stream never stops.
    """

    def __init__(
        self,
        model: OnnxModel,
        *,
        z: np.ndarray | None = None,
        keep: int = 384,
        batch: int = 1,
        session: Any = None,
    ) -> None:
        import onnxruntime as ort

        self.model = model
        # another decoder of the same shape (the diverged one), or the model's own
        self.session = session if session is not None else model.decoder
        self.batch = batch
        self.keep = min(keep, model.block_size // 2)
        B = batch
        shape = (B, model.n_head, model.block_size, model.head_size)
        self._cache = {n: np.zeros(shape, np.float32) for n in model.past_names}
        self._z = np.zeros((B, model.z_dim), np.float32)
        self._ids1 = np.zeros((B, 1), np.int64)
        self._seqlens = np.zeros((B,), np.int32)
        self._total = np.zeros((), np.int32)
        self._logits1 = np.zeros((B, 1, model.vocab_size), np.float32)
        as_value = ort.OrtValue.ortvalue_from_numpy  # wraps the numpy memory, no copy
        fixed = {"z": self._z, "seqlens_k": self._seqlens, "total_sequence_length": self._total}
        fixed.update(self._cache)
        values = {name: as_value(a) for name, a in fixed.items()}
        # the general binding (prefill, several tokens): ids and logits bound per call
        self._io = self.session.io_binding()
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
        self.session.run_with_iobinding(self._io)
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
        # a copy: the one-token path overwrites its logits buffer on the next step
        self.last_logits_all = logits[:, -1].copy()
        self.last_logits = self.last_logits_all[0]
        return logits[0].copy() if all_logits else self.last_logits
