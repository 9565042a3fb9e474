"""``divergent evaluate nll``: the shipped ONNX model vs an n-gram baseline, one run.

Both are scored on the same validation tokens, in nats per token:

- the model: the validation stream cut into windows of ``window`` tokens; each window
  is scored by the importance-weighted bound over latents drawn from q(z | window's
  second half), so ``model_nll`` is an upper bound on the model's true NLL (no
  information leaks through z for free); the ELBO and the z = 0 score are reported too;
- the baseline: interpolated modified Kneser-Ney fitted on the training split, with the
  best order in 3..6 chosen on the validation split (which favours the baseline), given
  its full preceding context even across window starts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from divergent.model.data import load_split
from divergent.model.runtime import OnnxModel

log = logging.getLogger(__name__)

__all__ = ["evaluate_nll", "model_window_nll"]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def _log_normal(z: np.ndarray, mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """log N(z; mu, diag(exp(logvar))) summed over the last axis."""
    return np.asarray(
        -0.5 * np.sum(np.log(2 * np.pi) + logvar + (z - mu) ** 2 / np.exp(logvar), axis=-1)
    )


def model_window_nll(
    model: OnnxModel, ids: np.ndarray, *, window: int = 512, samples: int = 8, seed: int = 0
) -> dict[str, Any]:
    """NLL bounds of ``ids`` under the model, in windows of ``window`` tokens.

    For each window, q(z | second half) is the encoder's posterior (as in training) and
    ``samples`` latents z_k ~ q are decoded in one batched call. Returned, in nats summed
    over every scored token (the first token of each window is not scored):

    - ``iwae``: -log mean_k p(x | z_k) p(z_k) / q(z_k | x), the importance-weighted bound
      (Burda et al., 2016), an upper bound on the true NLL, tighter than the ELBO;
    - ``elbo``: mean_k -log p(x | z_k) + KL(q || p);
    - ``z0``: -log p(x | z = 0), for reference only (not a bound).
    """
    rng = np.random.default_rng(seed)
    iwae = elbo = z0 = 0.0
    tokens = windows = 0
    kl_total = 0.0
    for s in range(0, len(ids) - 1, window):
        w = ids[s : s + window].astype(np.int64)
        if len(w) < 2:
            break
        # the posterior of the window's second half, as in training (any q gives a bound)
        mu, logvar = model.encode(w[len(w) // 2 :])
        eps = rng.standard_normal((samples, len(mu))).astype(np.float32)
        zs = mu + np.exp(0.5 * logvar) * eps
        batch_z = np.concatenate([zs, np.zeros((1, len(mu)), np.float32)])
        x = np.broadcast_to(w[:-1], (samples + 1, len(w) - 1)).copy()
        logits = model.logits(x, batch_z)
        lp = _log_softmax(logits)  # (K+1, T, V)
        ll = lp[:, np.arange(len(w) - 1), w[1:]].sum(-1)  # (K+1,)
        log_w = (
            ll[:samples]
            + _log_normal(zs, np.zeros_like(mu), np.zeros_like(logvar))
            - _log_normal(zs, mu, logvar)
        )
        m = float(log_w.max())
        iwae += -(m + float(np.log(np.mean(np.exp(log_w - m)))))
        kl = float(0.5 * np.sum(mu**2 + np.exp(logvar) - 1.0 - logvar))
        elbo += -float(ll[:samples].mean()) + kl
        kl_total += kl
        z0 += -float(ll[samples])
        tokens += len(w) - 1
        windows += 1
    return {
        "iwae": iwae,
        "elbo": elbo,
        "z0": z0,
        "tokens": tokens,
        "windows": windows,
        "kl_total": kl_total,
        "samples": samples,
    }


def evaluate_nll(
    *,
    data: Path,
    model_dir: Path | None = None,
    max_tokens: int | None = None,
    order: int | None = None,
    window: int = 512,
    precision: str = "int8",
) -> dict[str, Any]:
    """Validation NLL (nats/token) of the ONNX model and of the KN baseline."""
    from divergent.model.ngram import KneserNeyLM, select_order

    t0 = time.perf_counter()
    train, _ = load_split(data, "train")
    val, _ = load_split(data, "val")
    if max_tokens:
        val = val[:max_tokens]
    model = OnnxModel(model_dir, precision=precision)
    if model.vocab_size != len(model.tokenizer) or int(val.max()) >= model.vocab_size:
        raise ValueError("the dataset and the model use different vocabularies")
    window = min(window, model.block_size)
    m = model_window_nll(model, val, window=window)
    tokens = int(m["tokens"])
    model_nll = m["iwae"] / tokens
    # the baseline is scored on exactly the positions the model scored
    scored = np.zeros(len(val), dtype=bool)
    for s in range(0, len(val) - 1, window):
        scored[s + 1 : min(s + window, len(val))] = True
    t_model = time.perf_counter() - t0

    t1 = time.perf_counter()
    vocab_size = model.vocab_size
    if order is None:
        _, per_order = select_order(train, val, vocab_size=vocab_size)
        best = min(per_order, key=lambda k: per_order[k])
        lm = KneserNeyLM(order=best, vocab_size=vocab_size).fit(train)
    else:
        best = order
        lm = KneserNeyLM(order=order, vocab_size=vocab_size).fit(train)
        per_order = {}
    base = -lm.logprobs(val.astype(np.int64))
    baseline_nll = float(base[scored].mean())
    return {
        "model_nll": model_nll,
        "baseline_nll": baseline_nll,
        "tokens": tokens,
        "ratio": model_nll / baseline_nll,
        "model_nll_elbo": m["elbo"] / tokens,
        "model_nll_z0_not_a_bound": m["z0"] / tokens,
        "model_kl_per_window": m["kl_total"] / max(1, m["windows"]),
        "iwae_samples": m["samples"],
        "baseline_order": best,
        "baseline_nll_by_order": {str(k): v for k, v in per_order.items()},
        "precision": precision,
        "window": window,
        "seconds": {"model": round(t_model, 1), "baseline": round(time.perf_counter() - t1, 1)},
    }


def _stats(notes: list[Any], bars: int) -> dict[str, float]:
    if not notes:
        return {
            "mean_pitch": float("nan"),
            "notes_per_bar": 0.0,
            "mean_duration": float("nan"),
            "pitch_range": 0.0,
            "pc_entropy": 0.0,
        }
    pitches = np.array([n.pitch for n in notes], dtype=np.float64)
    pc = np.bincount(pitches.astype(np.int64) % 12, minlength=12) / len(pitches)
    nz = pc[pc > 0]
    return {
        "mean_pitch": float(pitches.mean()),
        "notes_per_bar": len(notes) / bars,
        "mean_duration": float(np.mean([n.duration_beats for n in notes])),
        "pitch_range": float(pitches.max() - pitches.min()),
        "pc_entropy": float(-(nz * np.log2(nz)).sum()),
    }


def evaluate_latent(
    *,
    data: Path,
    model_dir: Path | None = None,
    prompts: int = 6,
    latents: int = 6,
    seeds: int = 3,
    bars: int = 4,
    prompt_tokens: int = 128,
) -> dict[str, Any]:
    """Is the latent used? KL of validation windows, and output statistics vs z.

    For each validation prompt, continuations are sampled with several latents (the
    prompt's own posterior mean and draws from the prior N(0, I)) and several seeds per
    latent. If the decoder uses z, statistics vary more *between* latents than between
    seeds with the same latent: the F-like ratio (about 1 if z is ignored) is reported.
    """
    from divergent.model.generate import Generator

    val, offsets = load_split(data, "val")
    model = OnnxModel(model_dir)
    gen = Generator(model)
    rng = np.random.default_rng(0)
    # KL of the posterior of validation phrases (256 tokens: half a training window)
    kls = []
    dims = np.zeros(model.z_dim)
    for s in range(0, min(len(val), 256 * 128) - 256, 256):
        mu, logvar = model.encode(val[s : s + 256].astype(np.int64))
        kl = 0.5 * (mu**2 + np.exp(logvar) - 1 - logvar)
        kls.append(float(kl.sum()))
        dims += kl
    dims /= max(1, len(kls))
    # output statistics vs z
    starts = [int(o) for o in offsets[:-1] if offsets[-1] - o > prompt_tokens + 2]
    chosen = rng.choice(len(starts), size=min(prompts, len(starts)), replace=False)
    between: dict[str, list[float]] = {}
    within: dict[str, list[float]] = {}
    for ci in chosen:
        s = starts[int(ci)] + 1  # skip BOS
        prompt = val[s : s + prompt_tokens].astype(np.int64)
        bars_idx = np.flatnonzero(prompt == model.tokenizer.vocab.bar)
        if len(bars_idx) >= 2:
            prompt = prompt[: bars_idx[-1]]  # end the prompt at a bar line
        zs = [gen.latent(prompt)] + [
            rng.standard_normal(model.z_dim).astype(np.float32) for _ in range(latents - 1)
        ]
        table: list[list[dict[str, float]]] = []
        for z in zs:
            row = []
            for seed in range(seeds):
                cont = gen.continue_ids(prompt, bars=bars, seed=seed, z=z)
                row.append(_stats(cont.notes, bars))
            table.append(row)
        for key in table[0][0]:
            vals = np.array([[c[key] for c in row] for row in table], dtype=np.float64)
            if np.isnan(vals).any():
                continue
            between.setdefault(key, []).append(float(vals.mean(1).var()))
            within.setdefault(key, []).append(float(vals.var(1).mean()))
    # Under "z is ignored", the variance of per-latent means is within/seeds: normalise by
    # that so the ratio is ~1 when z does nothing and grows as z matters (an F statistic).
    ratio = {
        k: float(np.mean(between[k])) / max(1e-12, float(np.mean(within[k])) / seeds)
        for k in between
    }
    return {
        "kl_per_phrase_mean": float(np.mean(kls)),
        "kl_per_phrase_min": float(np.min(kls)),
        "kl_per_dim": [round(float(x), 4) for x in dims],
        "active_dims": int((dims > 0.05).sum()),
        "stat_variance_between_latents": {k: float(np.mean(v)) for k, v in between.items()},
        "stat_variance_within_latent": {k: float(np.mean(v)) for k, v in within.items()},
        "between_over_within": ratio,
        "prompts": len(chosen),
        "latents": latents,
        "seeds": seeds,
    }
