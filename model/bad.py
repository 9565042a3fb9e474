"""``divergent bad train``: Bounded Adversarial Divergence fine-tuning of the decoder.

The divergence-maximisation objective (``../shared/notes/seeds.md``; the authors'
``divergent-synthesis`` code, version "mmd"), in the frozen critic's feature space φ
(``model.critic``: its logits, standardised by the real phrases' mean and spread):

    L = w_class · Σ_c MMD²(φ(G), φ(X_c)) + λ · MMD²(φ(G), φ(X)) + β · KL(p_θ ‖ p_base)

with ``w_class = -1``: the generator G is pushed away from every class-conditional
distribution X_c and pulled back to the whole data X (the *bound*). An optional
``base_weight · MMD²(φ(G), φ(G_base))`` adds the base model's own answers to the same
prompts at the unpushed latents (the knob's d = 0 answers) as one more reference
(``--base-weight``; 0 by default: measured in ``docs/divergence.md``, not shipped).
The kernel is the authors': a per-dimension Gaussian ``exp(-(x - y)² / σ)`` summed over dimensions.
The KL term (per generated token, to the frozen base model) is a second bound on the
token level, as Magenta's RL Tuner used; it keeps answers decodable and musical.

Only the decoder is trained (token/position/latent embeddings, blocks, head); the
phrase encoder stays as it is. Each step samples continuations of real prompts (z = the
prompt's posterior mean, as when serving) with the current model, then takes the loss
through one of four gradient paths for discrete tokens (``method``):

- ``expected``: the critic reads the model's softmax rows (expected one-hot tokens, the
  analogue of the paper's Bernoulli means; TextGAN's soft-argmax), teacher-forced on the
  sampled prefix;
- ``gumbel_st``: straight-through Gumbel-softmax: hard one-hot forward, soft gradient;
- ``straight_through``: the critic reads the tokens actually sampled (so the loss, and
  the kernel's pull, are where the answers really are), the gradient flows back through
  the softmax rows as in ``expected``;
- ``policy_gradient``: the critic reads the sampled tokens; each sample's first
  variation of the set loss (its MMD witness value) is its cost in REINFORCE with a
  mean baseline.

Checkpoints (``ckpt.pt`` with optimizer state for ``--resume``; ``model.pt`` weights
only), a JSON-lines log, a tqdm bar and a wall-time budget, like ``divergent train``.
torch is imported by this module: training only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from divergent.model.bad_config import METHODS, BadConfig
from divergent.model.critic import PhraseBank, class_of_works, load_critic
from divergent.model.divergence import Steering
from divergent.model.files import CHECKPOINT_FILE, WEIGHTS_FILE
from divergent.model.tokenizer import Vocab
from divergent.model.train import load_model
from divergent.model.train_config import use_bf16
from divergent.model.transformer import Block, DivergentModel

log = logging.getLogger(__name__)

__all__ = ["METHODS", "BadConfig", "mmd2", "probe", "train_bad"]


def kernel(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, M) per-dimension Gaussian kernel summed over the D feature dimensions."""
    return torch.exp(-((x[:, None, :] - y[None, :, :]) ** 2) / sigma).sum(-1)


def mmd2(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Biased (V-statistic) squared MMD between feature sets x (N, D) and y (M, D)."""
    return kernel(x, x, sigma).mean() + kernel(y, y, sigma).mean() - 2 * kernel(x, y, sigma).mean()


def witness(
    g: torch.Tensor, reals: list[torch.Tensor], weights: list[float], sigma: float
) -> torch.Tensor:
    """Each sample's first variation of Σ_i w_i MMD²(G, R_i): its REINFORCE cost (N,)."""
    kgg = kernel(g, g, sigma).mean(1)
    out = torch.zeros(len(g), device=g.device)
    for r, w in zip(reals, weights, strict=True):
        out = out + w * 2 * (kgg - kernel(g, r, sigma).mean(1))
    return out


def banned_tokens(vocab: Vocab) -> torch.Tensor:
    """Tokens a continuation never samples: PAD, BOS, EOS and the reserved concepts."""
    ids = [vocab.pad, vocab.bos, vocab.eos, *vocab.concept_ids.tolist()]
    return torch.tensor(sorted(set(ids)), dtype=torch.int64)


def _step(
    model: DivergentModel, ids: torch.Tensor, z: torch.Tensor, past: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One incremental decoder call (the exported step's math), logits of the last token."""
    tr = model.transformer
    P = past[0].shape[2]
    pos = torch.arange(ids.shape[1], device=ids.device) + P
    x = tr.wte(ids) + tr.wpe(pos) + tr.wz(z).unsqueeze(1)
    present: list[torch.Tensor] = []
    for i, block in enumerate(tr.h):
        assert isinstance(block, Block)
        x, k, v = block.step(x, past[2 * i], past[2 * i + 1])
        present += [k, v]
    return model.lm_head(tr.ln_f(x[:, -1])), present


@torch.no_grad()
def sample(
    model: DivergentModel,
    prompt: torch.Tensor,
    z: torch.Tensor,
    n: int,
    banned: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """``n`` tokens (B, n) sampled at temperature 1 after ``prompt`` (B, P), KV-cached."""
    cfg = model.cfg
    B = prompt.shape[0]
    hs = cfg.n_embd // cfg.n_head
    past = [torch.zeros(B, cfg.n_head, 0, hs, device=prompt.device) for _ in range(2 * cfg.n_layer)]
    logits, past = _step(model, prompt, z, past)
    out = []
    for _ in range(n):
        logits = logits.float()
        logits[:, banned] = -torch.inf
        tok = torch.multinomial(F.softmax(logits, -1), 1, generator=gen)  # (B, 1)
        out.append(tok)
        logits, past = _step(model, tok, z, past)
    return torch.cat(out, 1)


class _Real:
    """Standardised critic features of real phrases, per class and all together."""

    def __init__(
        self, critic: torch.nn.Module, bank: PhraseBank, n: int, device: str | torch.device = "cpu"
    ) -> None:
        per, whole = bank.references(4 * n, np.random.default_rng(1))
        with torch.no_grad():
            feats = {c: critic(torch.from_numpy(x).to(device)) for c, x in per.items()}
            whole_f = critic(torch.from_numpy(whole).to(device))
        allf = torch.cat(list(feats.values()))
        self.mean = allf.mean(0)
        self.std = allf.std(0).clamp_min(1e-3)
        self.by_class = {c: self.std_(f) for c, f in feats.items()}
        self.whole = self.std_(whole_f)
        self.n = n

    def std_(self, f: torch.Tensor) -> torch.Tensor:
        return (f - self.mean) / self.std

    def draw(self, rng: np.random.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
        cls = [f[rng.choice(len(f), self.n, replace=False)] for f in self.by_class.values()]
        whole = self.whole[rng.choice(len(self.whole), self.n * 2, replace=False)]
        return cls, whole


def _prompts(
    bank: PhraseBank, n: int, P: int, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` real prompts of ``P`` tokens that end right before a bar line, class-balanced."""
    cls = sorted(bank.by_class)
    rows: list[np.ndarray] = []
    ys: list[int] = []
    while len(rows) < n:
        c = int(rng.choice(cls))
        w = int(rng.choice(bank.by_class[c]))
        a, _ = bank.works[w]
        bars = bank.bar_starts[w]
        bars = bars[bars - P >= a]
        if len(bars) == 0:
            continue
        b = int(rng.choice(bars))
        rows.append(bank.ids[b - P : b].astype(np.int64))
        ys.append(c)
    return torch.from_numpy(np.stack(rows)), np.array(ys)


def _latents(
    cfg: BadConfig, mu: torch.Tensor, steering: Steering | None, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents (B, Z) a step samples under (the posterior means, or the knob's mix),
    and the unpushed latents the same answers start from (the knob's d = 0 answers')."""
    if cfg.latents == "posterior" or steering is None:
        return mu, mu
    m = mu.float().cpu().numpy()
    out = m.copy()
    start = m.copy()
    kind = rng.integers(0, 3, len(m))
    for i in range(len(m)):
        if kind[i] == 1:  # where the knob's latent push puts it at a random d
            out[i] = steering.latent(m[i], float(rng.uniform(0, 1)), int(rng.integers(1 << 30)))
        elif kind[i] == 2:  # a prior sample, as the evaluation's latent temperatures do
            out[i] = start[i] = rng.uniform(0.5, 1.5) * rng.standard_normal(m.shape[1])
            if cfg.latents == "knob":  # ... and pushed, as the knob pushes it at d > 0
                d = float(rng.uniform(0, 1))
                out[i] = steering.latent(out[i], d, int(rng.integers(1 << 30)))

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32)).to(mu.device)

    return t(out), t(start)


def _trainable(model: DivergentModel) -> list[torch.nn.Parameter]:
    """The decoder's parameters (the phrase encoder and the bag-of-tokens head stay)."""
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(("encoder.", "bow_head.")))
    return [p for p in model.parameters() if p.requires_grad]


def _loss(
    cfg: BadConfig,
    model: DivergentModel,
    base: DivergentModel,
    critic: torch.nn.Module,
    real: _Real,
    prompt: torch.Tensor,
    z: torch.Tensor,
    gen_ids: torch.Tensor,
    rng: np.random.Generator,
    base_feats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The step's loss and its statistics; ``base_feats``: the base model's own answers'
    standardised critic features (with ``cfg.base_weight``), or None."""
    P, n = prompt.shape[1], gen_ids.shape[1]
    ids = torch.cat([prompt, gen_ids], 1)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        logits = model.decode(ids, z)[:, P - 1 : P + n - 1].float()  # (B, n, V)
        with torch.no_grad():
            base_logits = base.decode(ids, z)[:, P - 1 : P + n - 1].float()
    logp = F.log_softmax(logits, -1)
    base_logp = F.log_softmax(base_logits, -1)
    kl = (logp.exp() * (logp - base_logp)).sum(-1).mean()
    V = logits.shape[-1]
    hard = F.one_hot(gen_ids, V).float()
    cls, whole = real.draw(rng)
    refs = [*cls, whole]
    weights = [cfg.class_weight] * len(cls) + [cfg.global_weight]
    if base_feats is not None:
        refs.append(base_feats)
        weights.append(cfg.base_weight)
    with torch.no_grad():
        g_hard = real.std_(critic.forward_soft(hard))
    if cfg.method == "policy_gradient":
        cost = witness(g_hard, refs, weights, cfg.sigma)
        adv = (cost - cost.mean()).detach()
        tok_logp = logp.gather(-1, gen_ids.unsqueeze(-1)).squeeze(-1).sum(-1)  # (B,)
        div_loss = (adv * tok_logp).mean() / n
    else:
        if cfg.method == "expected":
            soft = logp.exp()
        elif cfg.method == "straight_through":
            # why: ``expected`` lowers the loss on softmax rows while the sampled tokens'
            # features barely move (docs/divergence.md); here the values are the samples'
            probs = logp.exp()
            soft = hard + probs - probs.detach()
        else:  # gumbel_st
            u = torch.rand(logp.shape, device=logp.device).clamp(1e-9, 1 - 1e-9)
            y = F.softmax((logp - torch.log(-torch.log(u))) / cfg.gumbel_tau, -1)
            soft = F.one_hot(y.argmax(-1), V).float() + y - y.detach()
        g = real.std_(critic.forward_soft(soft))
        div_loss = sum(
            (w * mmd2(g, r, cfg.sigma) for w, r in zip(weights, refs, strict=True)),
            torch.zeros((), device=logp.device),
        )
    loss = div_loss + cfg.kl_weight * kl
    with torch.no_grad():
        stats = {
            "loss": float(loss.detach()),
            "kl": float(kl.detach()),
            "mmd_classes": float(np.mean([float(mmd2(g_hard, r, cfg.sigma)) for r in cls])),
            "mmd_global": float(mmd2(g_hard, whole, cfg.sigma)),
        }
        if base_feats is not None:
            stats["mmd_base"] = float(mmd2(g_hard, base_feats, cfg.sigma))
    return loss, stats


@torch.no_grad()
def probe(
    model: DivergentModel,
    base: DivergentModel,
    critic: torch.nn.Module,
    real: _Real,
    prompts: torch.Tensor,
    z: torch.Tensor,
    n: int,
    banned: torch.Tensor,
    sigma: float,
) -> dict[str, float]:
    """Fixed prompts and seed: hard samples' MMD to classes/whole, base NLL per token."""
    gen = torch.Generator(prompts.device).manual_seed(1234)
    ids = sample(model, prompts, z, n, banned, gen)
    g = real.std_(critic(ids))
    full = torch.cat([prompts, ids], 1)
    P = prompts.shape[1]
    base_logp = F.log_softmax(base.decode(full, z)[:, P - 1 : P + n - 1].float(), -1)
    nll = -base_logp.gather(-1, ids.unsqueeze(-1)).mean()
    return {
        "mmd_classes": float(np.mean([float(mmd2(g, r, sigma)) for r in real.by_class.values()])),
        "mmd_global": float(mmd2(g, real.whole, sigma)),
        "base_nll": float(nll),
    }


def train_bad(cfg: BadConfig, *, progress: bool = True) -> dict[str, Any]:
    """Fine-tune per ``cfg``; returns the probe before and after, and the timing."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # None: bf16 only where the device computes it natively (what runs is recorded)
    cfg = dataclasses.replace(cfg, bf16=use_bf16(cfg.bf16, cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model, blob = load_model(cfg.base)
    model.to(device)
    base = copy.deepcopy(model).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    critic, cblob = load_critic(cfg.critic)
    critic.to(device)
    if cblob.get("tokenizer_hash") != blob.get("tokenizer_hash", cblob.get("tokenizer_hash")):
        raise ValueError("the critic was trained with another tokenizer than the base model")
    _, labels = class_of_works(cfg.data, int(cblob["config"]["min_works"]))
    bank = PhraseBank(cfg.data, "train", labels["train"], cfg.gen_tokens)
    vocab = bank.vocab
    banned = banned_tokens(vocab).to(device)
    real = _Real(critic, bank, cfg.real_per_class, device)
    params = _trainable(model)
    steering = Steering.from_model_dir(cfg.knob_model) if cfg.latents != "posterior" else None
    opt = torch.optim.Adam(params, lr=cfg.lr)
    step = 0
    ckpt = out / CHECKPOINT_FILE
    if cfg.resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        log.info("resumed BAD at step %d", step)
    rng = np.random.default_rng(cfg.seed + step)
    gen = torch.Generator(device).manual_seed(cfg.seed + step)
    probe_rng = np.random.default_rng(99)
    probe_prompts = _prompts(bank, 48, cfg.prompt_tokens, probe_rng)[0].to(device)
    with torch.no_grad():
        probe_z = model.encode(probe_prompts, torch.ones(probe_prompts.shape, device=device))[0]
    before = probe(
        base, base, critic, real, probe_prompts, probe_z, cfg.gen_tokens, banned, cfg.sigma
    )
    logf = (out / "log.jsonl").open("a")

    def save(name: str) -> None:
        meta = {
            # on the CPU, so that a checkpoint made on a GPU loads anywhere
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
            "model_config": blob["model_config"],
            "tokenizer_hash": blob.get("tokenizer_hash"),
            "bad_config": cfg.to_dict(),
            "step": step,
            "critic_classes": cblob["classes"],
        }
        if name == CHECKPOINT_FILE:
            meta["optimizer"] = opt.state_dict()
        tmp = out / f"{name}.tmp"
        torch.save(meta, tmp)
        tmp.replace(out / name)  # atomic: a killed run never leaves half a file

    bar = tqdm(total=cfg.steps, initial=step, desc=f"BAD {cfg.method}", disable=not progress)
    t_start = time.perf_counter()
    model.train()
    while step < cfg.steps:
        if cfg.max_minutes and (time.perf_counter() - t_start) / 60 > cfg.max_minutes:
            log.info("BAD: wall-time budget reached at step %d", step)
            break
        prompt = _prompts(bank, cfg.batch_size, cfg.prompt_tokens, rng)[0].to(device)
        with torch.no_grad():
            mu = model.encode(prompt, torch.ones(prompt.shape, device=device))[0]
            z, z0 = _latents(cfg, mu, steering, rng)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                gen_ids = sample(model, prompt, z, cfg.gen_tokens, banned, gen)
                # the base model's own answers to the same prompts, where d = 0 starts
                base_ids = (
                    sample(base, prompt, z0, cfg.gen_tokens, banned, gen)
                    if cfg.base_weight
                    else None
                )
            base_feats = None if base_ids is None else real.std_(critic(base_ids)).float()
        loss, stats = _loss(
            cfg, model, base, critic, real, prompt, z, gen_ids, rng, base_feats=base_feats
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if not math.isfinite(float(norm)):
            log.warning("BAD step %d: non-finite gradient, skipped", step)
            continue
        backup = [p.detach().clone() for p in params]
        opt.step()
        if any(not torch.isfinite(p).all() for p in params):
            # the authors roll back a step that produced NaN weights; so do we
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)
            log.warning("BAD step %d: non-finite weights, rolled back", step)
            continue
        step += 1
        bar.update()
        bar.set_postfix(
            kl=f"{stats['kl']:.3f}",
            cls=f"{stats['mmd_classes']:.2f}",
            glob=f"{stats['mmd_global']:.2f}",
        )
        logf.write(
            json.dumps({"step": step, "t": round(time.perf_counter() - t0, 1), **stats}) + "\n"
        )
        logf.flush()
        if step % cfg.checkpoint_every == 0:
            save(CHECKPOINT_FILE)
            save(WEIGHTS_FILE)
    bar.close()
    save(CHECKPOINT_FILE)
    save(WEIGHTS_FILE)
    model.eval()
    after = probe(
        model, base, critic, real, probe_prompts, probe_z, cfg.gen_tokens, banned, cfg.sigma
    )
    result = {
        "method": cfg.method,
        "steps": step,
        "minutes": round((time.perf_counter() - t0) / 60, 2),
        "probe_before": before,
        "probe_after": after,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "config": cfg.to_dict(),
    }
    (out / "bad_result.json").write_text(json.dumps(result, indent=1))
    logf.close()
    return result
