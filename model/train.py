"""``divergent train``: train the latent-conditioned transformer on a built dataset.

Periodic validation, checkpoints (``<out>/ckpt.pt`` with optimizer state, for resume;
``<out>/model.pt`` with weights only, the file worth keeping), bf16 autocast on CPU,
a wall-time limit that stops cleanly, and a JSON-lines log of every evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from divergent.model.data import load_split, transpose_ids
from divergent.model.files import (
    CHECKPOINT_FILE,
    TOKENIZER_FILE,
    TRAIN_CONFIG_FILE,
    WEIGHTS_FILE,
)
from divergent.model.tokenizer import Vocab, load_tokenizer
from divergent.model.train_config import TrainConfig, use_bf16
from divergent.model.transformer import DivergentModel, ModelConfig, encoder_mask

log = logging.getLogger(__name__)

__all__ = ["Batcher", "evaluate", "load_model", "train"]


class Batcher:
    """Random training windows with transposition augmentation, as torch tensors."""

    def __init__(
        self, ids: np.ndarray, seq_len: int, vocab: Vocab, *, transpose: int, seed: int
    ) -> None:
        if len(ids) < seq_len + 2:
            raise ValueError(f"split has {len(ids)} tokens, fewer than one window")
        self.ids = ids
        self.seq_len = seq_len
        self.vocab = vocab
        self.transpose = transpose
        self.rng = np.random.default_rng(seed)

    def batch(
        self, batch_size: int, seq_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T = seq_len or self.seq_len
        starts = self.rng.integers(0, len(self.ids) - T - 1, size=batch_size)
        rows = []
        for s in starts:
            w = self.ids[s : s + T + 1].astype(np.int64)
            if self.transpose:
                k = int(self.rng.integers(-self.transpose, self.transpose + 1))
                shifted = transpose_ids(w, k, self.vocab)
                w = shifted if shifted is not None else w
            rows.append(w)
        arr = torch.from_numpy(np.stack(rows))
        return arr[:, :-1].contiguous(), arr[:, 1:].contiguous()


def val_windows(ids: np.ndarray, seq_len: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed, evenly spaced validation windows (deterministic across runs)."""
    n = max(1, min(n, (len(ids) - 1) // seq_len))
    starts = np.linspace(0, len(ids) - seq_len - 1, n).astype(np.int64)
    arr = torch.from_numpy(np.stack([ids[s : s + seq_len + 1].astype(np.int64) for s in starts]))
    return arr[:, :-1].contiguous(), arr[:, 1:].contiguous()


@torch.no_grad()
def evaluate_short(
    model: DivergentModel, x: torch.Tensor, y: torch.Tensor, *, bf16: bool
) -> dict[str, float]:
    """Short phrases, z from the whole phrase vs z = 0: how much the decoder follows z."""
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        mu, _ = model.encode(x, torch.ones(x.shape))
        logits = model.decode(x, mu.float())
        logits0 = model.decode(x, torch.zeros_like(mu.float()))
    ce = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), y.reshape(-1)
    )
    ce0 = torch.nn.functional.cross_entropy(
        logits0.float().reshape(-1, logits0.size(-1)), y.reshape(-1)
    )
    model.train()
    return {"val_short_ce_mu": float(ce), "val_short_ce_z0": float(ce0)}


@torch.no_grad()
def evaluate(
    model: DivergentModel, x: torch.Tensor, y: torch.Tensor, *, bf16: bool, batch: int = 16
) -> dict[str, float]:
    """Validation CE with z ~ q(z|x), KL, the ELBO bound per token, and CE at z = 0."""
    model.eval()
    ce_sum = ce0_sum = kl_sum = 0.0
    n_tok = 0
    kl_dims = torch.zeros(model.cfg.z_dim)
    gen = torch.Generator().manual_seed(0)
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        mask = encoder_mask(xb)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            mu, logvar = model.encode(xb, mask)
            eps = torch.randn(mu.shape, generator=gen)
            z = mu.float() + eps * torch.exp(0.5 * logvar.float())
            logits = model.decode(xb, z)
            logits0 = model.decode(xb, torch.zeros_like(z))
        ce = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), yb.reshape(-1), reduction="sum"
        )
        ce0 = torch.nn.functional.cross_entropy(
            logits0.float().reshape(-1, logits0.size(-1)), yb.reshape(-1), reduction="sum"
        )
        kl = 0.5 * (mu.float() ** 2 + logvar.float().exp() - 1 - logvar.float())  # (B, Z)
        ce_sum += float(ce)
        ce0_sum += float(ce0)
        kl_sum += float(kl.sum())
        kl_dims += kl.sum(0)
        n_tok += yb.numel()
    model.train()
    n_win = len(x)
    return {
        "val_ce": ce_sum / n_tok,
        "val_elbo": (ce_sum + kl_sum) / n_tok,  # an upper bound on NLL per token
        "val_ce_z0": ce0_sum / n_tok,
        "val_kl_window": kl_sum / n_win,
        "val_kl_active_dims": int((kl_dims / n_win > 0.05).sum()),
    }


def _lr(step: int, cfg: TrainConfig, minutes: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to min_lr by max_steps or max_minutes (first)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.max_minutes > 0:
        # a wall-time budget: the schedule ends when the time does, whatever the speed
        frac = max(frac, min(1.0, minutes / cfg.max_minutes))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)


def load_model(path: str | Path) -> tuple[DivergentModel, dict[str, Any]]:
    """A model from ``model.pt`` or ``ckpt.pt`` (weights + config), in eval mode."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=False)
    model = DivergentModel(ModelConfig.from_dict(blob["model_config"]))
    model.load_state_dict(blob["model"])
    model.eval()
    return model, blob


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train per ``cfg``; returns the last evaluation."""
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    bf16 = use_bf16(cfg.bf16)
    cfg = dataclasses.replace(cfg, bf16=bf16)  # what runs is what the checkpoint records
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(Path(cfg.data) / TOKENIZER_FILE)
    train_ids, _ = load_split(cfg.data, "train")
    val_ids, _ = load_split(cfg.data, "val")
    mcfg = ModelConfig(
        vocab_size=len(tok),
        block_size=cfg.block_size,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        dropout=cfg.dropout,
        z_dim=cfg.z_dim,
    )
    model = DivergentModel(mcfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    step = 0
    best = float("inf")
    elapsed_before = 0.0
    ckpt_path = out / CHECKPOINT_FILE
    if cfg.resume and ckpt_path.exists():
        blob = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        missing, unexpected = model.load_state_dict(blob["model"], strict=False)
        if unexpected:
            raise ValueError(f"checkpoint has parameters this model lacks: {unexpected}")
        if missing:
            # a training-only head added since the checkpoint: fresh optimizer moments
            log.warning("resuming without optimizer state; new parameters: %s", missing)
        else:
            opt.load_state_dict(blob["optimizer"])
        step = int(blob["step"])
        best = float(blob.get("best_val", best))
        elapsed_before = float(blob.get("train_seconds", 0.0))
        log.info("resumed from %s at step %d", ckpt_path, step)
    (out / TRAIN_CONFIG_FILE).write_text(cfg.to_json())
    tok.save(out / TOKENIZER_FILE)

    batcher = Batcher(
        train_ids, cfg.seq_len, tok.vocab, transpose=cfg.transpose, seed=cfg.seed + step
    )
    vx, vy = val_windows(val_ids, cfg.seq_len, cfg.eval_windows)
    sx, sy = val_windows(val_ids, cfg.aux_seq_len or 64, 4 * cfg.eval_windows)
    log.info(
        "model %.2fM params, %d train / %d val tokens",
        model.num_params() / 1e6,
        len(train_ids),
        len(val_ids),
    )
    logf = (out / "log.jsonl").open("a")
    t0 = time.perf_counter()
    tokens_seen = 0
    last: dict[str, float] = {}

    def save(kind: str, metrics: dict[str, float]) -> None:
        blob = {
            "model": model.state_dict(),
            "model_config": mcfg.to_dict(),
            "train_config": json.loads(cfg.to_json()),
            "tokenizer_hash": tok.hash,
            "step": step,
            "metrics": metrics,
            "train_seconds": elapsed_before + time.perf_counter() - t0,
            "best_val": best,
        }
        if kind == "ckpt":
            blob["optimizer"] = opt.state_dict()
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(blob, tmp)
            tmp.replace(ckpt_path)
        else:
            tmp = (out / WEIGHTS_FILE).with_suffix(".tmp")
            torch.save(blob, tmp)
            tmp.replace(out / WEIGHTS_FILE)

    model.train()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", mininterval=5)
    stop_reason = "max_steps"
    while step < cfg.max_steps:
        lr = _lr(step, cfg, elapsed_before / 60 + (time.perf_counter() - t0) / 60)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batcher.batch(cfg.batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, ce, kl_dims, bow = model(x, y)
        beta = cfg.kl_beta * min(1.0, step / max(1, cfg.kl_warmup_steps))
        # free bits: below the floor a dimension's KL has no gradient, so the encoder can
        # carry that much information for free and the decoder learns to use it
        kl_term = torch.clamp(kl_dims.float(), min=cfg.free_bits).sum() / cfg.seq_len
        loss = ce + beta * kl_term + cfg.bow_weight * bow
        if cfg.aux_batch_size and cfg.aux_seq_len:
            ax, ay = batcher.batch(cfg.aux_batch_size, cfg.aux_seq_len)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                _, ce_aux, kl_aux, bow_aux = model(ax, ay, whole_window=True)
            kl_aux_term = torch.clamp(kl_aux.float(), min=cfg.free_bits).sum() / cfg.aux_seq_len
            loss = loss + ce_aux + beta * kl_aux_term + cfg.bow_weight * bow_aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        bar.update()
        if step % 20 == 0:
            bar.set_postfix(
                ce=f"{float(ce.detach()):.3f}", kl=f"{float(kl_dims.detach().sum()):.1f}"
            )
        minutes = (time.perf_counter() - t0) / 60
        out_of_time = cfg.max_minutes > 0 and elapsed_before / 60 + minutes >= cfg.max_minutes
        if step % cfg.eval_interval == 0 or step == cfg.max_steps or out_of_time:
            metrics = evaluate(model, vx, vy, bf16=bf16)
            metrics.update(evaluate_short(model, sx, sy, bf16=bf16))
            metrics.update(
                step=step,
                lr=lr,
                train_ce=ce.item(),
                tok_per_s=tokens_seen / (time.perf_counter() - t0),
                minutes=elapsed_before / 60 + minutes,
            )
            logf.write(json.dumps(metrics) + "\n")
            logf.flush()
            log.info("step %d %s", step, {k: round(v, 4) for k, v in metrics.items()})
            if metrics["val_elbo"] < best:
                best = metrics["val_elbo"]
                save("model", metrics)
            save("ckpt", metrics)
            last = metrics
        if out_of_time:
            stop_reason = "max_minutes"
            break
    bar.close()
    logf.close()
    log.info("stopped (%s) at step %d", stop_reason, step)
    return last
