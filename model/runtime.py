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

from model.tokenizer import DivergentTokenizer, load_tokenizer

log = logging.getLogger(__name__)

__all__ = [
    "IncrementalDecoder",
    "ModelError",
    "ModelFiles",
    "OnnxModel",
    "default_model_dir",
    "providers",
]


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
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def encoder(self) -> Path:
        return self.root / "encoder.onnx"

    def decoder(self, precision: str) -> Path:
        if precision not in ("int8", "fp32"):
            raise ModelError(f"precision must be int8 or fp32, got {precision!r}")
        return self.root / f"decoder.{precision}.onnx"

    def check(self, precision: str = "int8") -> dict[str, Any]:
        """The parsed config, after checking the folder has what the runtime needs."""
        for p in (self.config, self.tokenizer, self.encoder, self.decoder(precision)):
            if not p.exists():
                raise ModelError(f"model folder {self.root} is missing {p.name}")
        try:
            cfg: dict[str, Any] = json.loads(self.config.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{self.config}: not valid JSON: {e}") from e
        if cfg.get("format") != 1 or "model" not in cfg or "io" not in cfg:
            raise ModelError(f"{self.config}: not a divergent model config")
        return cfg


def providers() -> list[str]:
    """CUDA first when this ONNX Runtime build has it (onnxruntime-gpu), then CPU."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    chosen = [p for p in ("CUDAExecutionProvider",) if p in avail]
    return [*chosen, "CPUExecutionProvider"]


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
        prov = ["CPUExecutionProvider"] if device == "cpu" else providers()
        if precision == "auto":
            # int8 (dynamic quantisation) is the fast path on CPU; CUDA runs fp32
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
            raise ModelError("tokenizer.json does not match the model's config")
        so = ort.SessionOptions()
        # One intra-op thread was stable here; two varied 2x between processes on 2 vCPUs.
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.decoder = ort.InferenceSession(
                str(self.files.decoder(precision)), so, providers=prov
            )
            self.encoder = ort.InferenceSession(str(self.files.encoder), so, providers=prov)
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

    def empty_cache(self) -> dict[str, np.ndarray]:
        shape = (1, self.n_head, 0, self.head_size)
        return {n: np.zeros(shape, np.float32) for n in self.past_names}


class IncrementalDecoder:
    """Feed tokens, read the next-token logits; the KV cache lives between calls.

    With ``batch`` > 1 every row shares the same token history but has its own latent
    (``set_z`` takes (batch, z_dim)): one ONNX call decodes, e.g., the steered answer and
    the base model's view of it side by side, for an exact surprisal readout.

    When the context reaches the model's ``block_size``, the last ``keep`` tokens are
    re-fed as a fresh prefill (positions restart), so a live stream never stops.
    """

    def __init__(
        self, model: OnnxModel, *, z: np.ndarray | None = None, keep: int = 384, batch: int = 1
    ) -> None:
        self.model = model
        self.batch = batch
        self.keep = min(keep, model.block_size // 2)
        self._z = np.zeros((batch, model.z_dim), np.float32)
        if z is not None:
            self.set_z(z)
        self.reset()

    def reset(self) -> None:
        shape = (self.batch, self.model.n_head, 0, self.model.head_size)
        self.cache = {n: np.zeros(shape, np.float32) for n in self.model.past_names}
        self.tokens: list[int] = []
        self.last_logits_all = np.zeros((self.batch, self.model.vocab_size), np.float32)
        self.last_logits = self.last_logits_all[0]

    @property
    def z(self) -> np.ndarray:
        return self._z[0]

    def set_z(self, z: np.ndarray) -> None:
        """Change the latent(s); acts from the next fed token on (the cache is kept)."""
        z = np.asarray(z, dtype=np.float32)
        z = np.broadcast_to(z.reshape(-1, z.shape[-1]), (self.batch, z.shape[-1])).copy()
        if z.shape[1] != self.model.z_dim:
            raise ValueError(f"z must have {self.model.z_dim} values, got {z.shape[1]}")
        self._z = z

    def _run(self, ids: np.ndarray) -> np.ndarray:
        feed: dict[str, np.ndarray] = {"input_ids": ids, "z": self._z}
        feed.update(self.cache)
        out = self.model.decoder.run(self.model.output_names, feed)
        for name, value in zip(self.model.past_names, out[1:], strict=True):
            self.cache[name] = value
        return np.asarray(out[0])  # (B, T, V)

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
        ids = np.broadcast_to(np.asarray(toks, dtype=np.int64), (self.batch, len(toks)))
        logits = self._run(np.ascontiguousarray(ids))
        self.tokens.extend(toks)
        self.last_logits_all = logits[:, -1]
        self.last_logits = self.last_logits_all[0]
        return logits[0] if all_logits else self.last_logits
