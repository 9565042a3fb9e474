"""The divergence knob: a bounded, measured departure from what the model learned.

d in [0, 1]. d = 0 is plain sampling from the model (the prompt's own latent, no token
steering, no extra bounds). As d rises, three things happen together (see
``docs/divergence.md`` for the design and the measured curves):

1. **Latent steering.** The prompt's posterior mean mu is moved along a unit direction u
   pointing *away from the nearest training latents* (mu minus the mean of its k nearest
   neighbours in a bank of training-phrase latents shipped with the model), by
   ``d * latent_scale * sqrt(z_dim)``. At d = 1 the latent lies beyond the prior's typical
   shell (radius ~sqrt(z_dim)), where the decoder has seen few phrases.
2. **Token steering** (contrastive): the next-token log-probabilities are lowered by
   ``d * token_lambda * log p_ref(token | previous token)``, where p_ref is a bigram model
   of the training tokens: commonplace transitions lose weight. A **support bound** keeps
   only tokens the model itself finds plausible in context (p >= plausibility * p_max),
   so the departure stays inside what the context supports.
3. **Musical bounds** (d > 0 only): the grammar (every answer decodes, the prompt's metre),
   no empty bars, a register within ``register_margin`` semitones of the prompt's range,
   and no pitch repeated more than ``max_repeats`` times in a row.

Nothing here imports torch; the banks are small ``.npy`` files in the model folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from divergent.model.configs import StrictConfig
from divergent.model.files import BIGRAM_FILE, CONFIG_FILE, LATENTS_FILE

__all__ = [
    "DivergenceConfig",
    "LatentBank",
    "ReferenceBigram",
    "Steering",
    "build_reference_bigram",
    "knob_config",
    "mix_logits",
]


@dataclass(frozen=True)
class DivergenceConfig(StrictConfig):
    config_name: ClassVar[str] = "divergence options"
    latent_scale: float = 2.5  # shift at d = 1, in units of sqrt(z_dim)
    token_lambda: float = 1.0  # contrastive weight at d = 1
    plausibility: float = 0.02  # support bound at d = 1: p >= d * plausibility * p_max
    register_margin: int = 7  # semitones beyond the prompt's pitch range, at d = 1
    max_repeats: int = 4  # same pitch in a row, at most, at d = 1
    #: the bounds tighten as the knob opens (so d -> 0 joins plain sampling smoothly):
    #: margin + (1 - d) * loose_margin semitones, max_repeats + (1 - d) * loose_repeats
    loose_margin: int = 12
    loose_repeats: int = 8
    empty_bars_from: float = 0.5  # no empty bars from this d on
    k_nearest: int = 16
    #: anchoring (0 = off): before the push, the latent moves ``d * anchor`` of the way
    #: from the prompt's to an anchor, a training latent drawn (per seed) among the less
    #: common ones: those whose mean distance to their ``k_nearest`` neighbours in the
    #: bank is at or above this quantile. The push then starts from real, rarer music
    #: rather than from wherever the prompt sits (``docs/divergence.md``).
    anchor: float = 0.0
    anchor_rarity: float = 0.5
    #: the learned divergence (``divergent bad train``): the next-token logits are
    #: base + w(d) * (diverged - base), w(d) = bad_weight * d ** bad_curve; 0 = unused
    bad_weight: float = 1.0
    bad_curve: float = 1.0

    def __post_init__(self) -> None:
        if self.latent_scale < 0 or self.token_lambda < 0:
            raise ValueError("latent_scale and token_lambda must be >= 0")
        if not 0.0 < self.plausibility < 1.0:
            raise ValueError("plausibility must be in (0, 1)")
        if self.register_margin < 0 or self.max_repeats < 1 or self.k_nearest < 1:
            raise ValueError("register_margin >= 0, max_repeats >= 1, k_nearest >= 1")
        if not 0.0 <= self.anchor <= 1.0 or not 0.0 <= self.anchor_rarity < 1.0:
            raise ValueError("anchor must be in [0, 1] and anchor_rarity in [0, 1)")
        if self.bad_weight < 0 or self.bad_curve <= 0:
            raise ValueError("bad_weight must be >= 0 and bad_curve > 0")


def _load_array(path: str | Path, what: str) -> np.ndarray:
    """A saved .npy array (never pickles), with one clear error for a bad file."""
    try:
        return np.asarray(np.load(Path(path), allow_pickle=False))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load {what} {path}: {e}") from e


class LatentBank:
    """Posterior means of training phrases: where the training data puts the latent."""

    def __init__(self, latents: np.ndarray) -> None:
        lat = np.asarray(latents, dtype=np.float32)
        if lat.ndim != 2 or len(lat) < 2:
            raise ValueError("a latent bank needs an (N >= 2, z_dim) array")
        self.latents = lat
        self.sq = (lat**2).sum(1)

    @classmethod
    def load(cls, path: str | Path) -> LatentBank:
        return cls(_load_array(path, "latent bank"))

    def save(self, path: str | Path) -> None:
        np.save(Path(path), self.latents.astype(np.float16))

    def nearest_mean(self, z: np.ndarray, k: int) -> np.ndarray:
        d2 = self.sq - 2.0 * (self.latents @ z) + float(z @ z)
        k = min(k, len(d2))
        idx = np.argpartition(d2, k - 1)[:k]
        return np.asarray(self.latents[idx].mean(0))

    def rarity(self, k: int) -> np.ndarray:
        """Per latent, its mean distance to its k nearest others: large = less common.

        One (N, N) Gram product, in row blocks so a large bank stays a few MB."""
        n = len(self.latents)
        k = min(k, n - 1)
        out = np.empty(n, np.float32)
        for a in range(0, n, 512):
            block = self.latents[a : a + 512]
            d2 = self.sq[a : a + 512, None] - 2.0 * (block @ self.latents.T) + self.sq[None]
            d2[np.arange(len(block)), np.arange(a, a + len(block))] = np.inf  # not itself
            near = np.partition(np.maximum(d2, 0.0), k - 1, axis=1)[:, :k]
            out[a : a + len(block)] = np.sqrt(near).mean(1)
        return out

    def distance(self, z: np.ndarray, k: int = 16) -> float:
        """Mean distance from z to its k nearest training latents."""
        d2 = np.maximum(self.sq - 2.0 * (self.latents @ z) + float(z @ z), 0.0)
        k = min(k, len(d2))
        return float(np.sqrt(np.partition(d2, k - 1)[:k]).mean())


class ReferenceBigram:
    """log p_ref(next | previous) over the vocabulary, from the training tokens."""

    def __init__(self, logp: np.ndarray) -> None:
        lp = np.asarray(logp, dtype=np.float32)
        if lp.ndim != 2 or lp.shape[0] != lp.shape[1]:
            raise ValueError("a reference bigram is a (V, V) array")
        self.logp = lp

    @classmethod
    def load(cls, path: str | Path) -> ReferenceBigram:
        return cls(_load_array(path, "reference bigram"))

    def save(self, path: str | Path) -> None:
        np.save(Path(path), self.logp.astype(np.float16))


def build_reference_bigram(ids: np.ndarray, vocab_size: int, alpha: float = 0.1) -> ReferenceBigram:
    """Add-alpha smoothed bigram log-probabilities of a token stream."""
    a = np.asarray(ids, dtype=np.int64)
    counts = np.bincount(a[:-1] * vocab_size + a[1:], minlength=vocab_size * vocab_size)
    c = counts.reshape(vocab_size, vocab_size).astype(np.float64) + alpha
    return ReferenceBigram(np.log(c / c.sum(1, keepdims=True)))


def mix_logits(base: np.ndarray, diverged: np.ndarray, w: float) -> np.ndarray:
    """The learned divergence at weight w: ``base + w * (diverged - base)``.

    w = 0 is the base model exactly; w = 1 the BAD-tuned decoder; in between (and beyond,
    if ``bad_weight`` > 1) a geometric path between the two distributions, along which
    the KL from the base distribution grows monotonically with w (it is convex in w and 0
    at w = 0), so the knob's departure is monotone token by token.
    """
    if w == 0.0:
        return base
    if w == 1.0:
        return diverged
    return np.asarray(base + np.float32(w) * (diverged - base), dtype=np.float32)


def knob_config(root: str | Path) -> DivergenceConfig:
    """The knob settings a model folder ships (``config.json``'s ``"divergence"``), or the
    defaults. A model with a BAD-tuned decoder ships the settings its evaluation chose."""
    import json

    path = Path(root) / CONFIG_FILE
    if not path.exists():
        return DivergenceConfig()
    try:
        d = json.loads(path.read_text()).get("divergence")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    return DivergenceConfig.from_dict(d) if d else DivergenceConfig()


class Steering:
    """Applies the knob: a latent for the answer, and per-token logit adjustments."""

    def __init__(
        self,
        *,
        bank: LatentBank | None,
        bigram: ReferenceBigram | None,
        config: DivergenceConfig | None = None,
    ) -> None:
        self.bank = bank
        self.bigram = bigram
        self.config = config or DivergenceConfig()
        self._anchors: np.ndarray | None = None  # bank rows anchors are drawn from

    def anchors(self) -> np.ndarray:
        """Indices of the bank's latents the anchor is drawn among (computed once)."""
        if self.bank is None:
            raise ValueError("anchoring needs the model's latent bank")
        if self._anchors is None:
            r = self.bank.rarity(self.config.k_nearest)
            self._anchors = np.flatnonzero(r >= np.quantile(r, self.config.anchor_rarity))
        return self._anchors

    @classmethod
    def from_model_dir(cls, root: str | Path, config: DivergenceConfig | None = None) -> Steering:
        root = Path(root)
        bank = LatentBank.load(root / LATENTS_FILE) if (root / LATENTS_FILE).exists() else None
        bigram = ReferenceBigram.load(root / BIGRAM_FILE) if (root / BIGRAM_FILE).exists() else None
        if config is None:
            config = knob_config(root)
        return cls(bank=bank, bigram=bigram, config=config)

    def mix_weight(self, d: float) -> float:
        """w(d): how much of the diverged decoder's logit difference the knob adds."""
        c = self.config
        return c.bad_weight * float(np.clip(d, 0.0, 1.0)) ** c.bad_curve

    def direction(self, mu: np.ndarray, seed: int) -> np.ndarray:
        """Unit vector from the nearest training latents towards (and past) mu."""
        mu = np.asarray(mu, dtype=np.float32)
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal(mu.shape).astype(np.float32)
        if self.bank is not None:
            away = mu - self.bank.nearest_mean(mu, self.config.k_nearest)
            n = float(np.linalg.norm(away))
            if n > 1e-3:
                # a little seeded noise so different seeds explore around the direction
                u = away / n + 0.25 * noise / math.sqrt(len(mu))
                return np.asarray(u / np.linalg.norm(u), dtype=np.float32)
        return np.asarray(noise / np.linalg.norm(noise), dtype=np.float32)

    def latent(
        self, mu: np.ndarray, d: float, seed: int = 0, *, anchor_seed: int | None = None
    ) -> np.ndarray:
        """The answer's latent at knob position d (mu itself at d = 0).

        ``anchor_seed`` draws the anchor (default: ``seed``): answers that share it share
        their anchor, e.g. the bars of one jam phrase, while each keeps its own push."""
        d = float(np.clip(d, 0.0, 1.0))
        mu = np.asarray(mu, dtype=np.float32)
        if d == 0.0:
            return mu
        c = self.config
        if c.anchor > 0.0 and self.bank is not None:
            # its own stream, so the push's seeded noise is the same with or without it
            rng = np.random.default_rng((seed if anchor_seed is None else anchor_seed, 0xA1C))
            target = self.bank.latents[rng.choice(self.anchors())]
            mu = np.asarray(mu + (d * c.anchor) * (target - mu), dtype=np.float32)
        step = d * c.latent_scale * math.sqrt(len(mu))
        return np.asarray(mu + step * self.direction(mu, seed), dtype=np.float32)

    def register_margin(self, d: float) -> int:
        c = self.config
        return c.register_margin + round((1.0 - d) * c.loose_margin)

    def max_repeats(self, d: float) -> int:
        c = self.config
        return c.max_repeats + round((1.0 - d) * c.loose_repeats)

    def adjust(self, logits: np.ndarray, mask: np.ndarray, prev: int, d: float) -> np.ndarray:
        """Steered logits (masked tokens stay -inf); the identity at d = 0."""
        if d <= 0.0 or self.bigram is None:
            return logits
        x = logits + mask
        top = float(x.max())
        # support bound: only tokens within log(d * plausibility) of the best survive;
        # it tightens with d, so small d is close to plain sampling
        keep = x >= top + math.log(d * self.config.plausibility)
        steered = x - (d * self.config.token_lambda) * self.bigram.logp[prev]
        return np.where(keep, steered, -np.inf).astype(np.float32)
