"""The divergent model: a small decoder-only transformer with a latent conditioning path.

One readable file (after nanoGPT's ``model.py``). Training and export only: serving runs
the exported ONNX graphs and never imports this module.

The latent path (CVAE-style):

- :class:`LatentEncoder` reads a phrase as a bag of learned token embeddings and maps it
  to a diagonal Gaussian q(z | phrase), z in R^z_dim. In training the phrase is the
  second half of the window, so z describes the material the decoder is about to
  produce; at run time z = E[z | the prompt's last phrase] ("more of the same"), and the
  divergence knob moves it. A bag of
  tokens is deliberately cheap (no attention): it sees what a phrase *is* (which pitches,
  durations, positions, how dense), which is exactly what the divergence knob moves.
- The decoder adds ``W_z z`` to every input embedding, so z conditions every step, and a
  live change of z (the knob) acts on the next token without recomputing the KV cache.
- Training minimises cross-entropy + beta * sum_d max(KL_d, free_bits): the free-bits floor
  keeps the KL from collapsing to zero, so the decoder learns to use z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.nn import functional as F

from divergent.model.configs import StrictConfig

__all__ = ["DivergentModel", "ModelConfig", "StepModel"]


@dataclass
class ModelConfig(StrictConfig):
    """The network's shape: ``config.json``'s ``"model"`` and a checkpoint's ``model_config``."""

    config_name: ClassVar[str] = "model config"

    vocab_size: int = 411
    block_size: int = 640  # longest context (positions) the model is trained for
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True
    z_dim: int = 16
    enc_embd: int = 128

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be divisible by n_head")
        if min(self.vocab_size, self.block_size, self.n_layer, self.z_dim) <= 0:
            raise ValueError("sizes must be positive")


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def step(
        self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention over (past + x) with explicit math, for ONNX export with a KV cache.

        x: (B, T, C); past_k/v: (B, nh, P, hs). Returns y (B, T, C), present k/v
        (B, nh, P+T, hs). Explicit math exports to plain MatMul/Softmax, which ONNX
        Runtime runs faster than an exported SDPA for one-token steps.
        """
        B, T, C = x.shape
        q, k, v = self._qkv(x)
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        P = past_k.shape[2]
        S = P + T
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))  # (B, nh, T, S)
        # query i (absolute position P+i) may see keys j <= P+i
        qi = torch.arange(T, device=x.device).unsqueeze(1) + P
        kj = torch.arange(S, device=x.device).unsqueeze(0)
        att = att.masked_fill(kj > qi, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def step(
        self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, k, v = self.attn.step(self.ln_1(x), past_k, past_v)
        x = x + a
        return x + self.mlp(self.ln_2(x)), k, v


class LatentEncoder(nn.Module):
    """q(z | phrase): mean of learned token embeddings -> MLP -> (mu, logvar)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.emb = nn.Embedding(cfg.vocab_size, cfg.enc_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.enc_embd, 2 * cfg.enc_embd),
            nn.GELU(approximate="tanh"),
            nn.Linear(2 * cfg.enc_embd, 2 * cfg.z_dim),
        )

    def forward(self, idx: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """idx (B, T) int64, mask (B, T) float 1 for real tokens -> mu, logvar (B, z_dim)."""
        e = self.emb(idx) * mask.unsqueeze(-1)  # (B, T, E)
        pooled = e.sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)  # (B, E)
        mu, logvar = self.mlp(pooled).chunk(2, dim=-1)
        return mu, logvar.clamp(-10.0, 5.0)


class DivergentModel(nn.Module):
    """Decoder-only transformer conditioned on a latent z (added to every embedding)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                wz=nn.Linear(cfg.z_dim, cfg.n_embd, bias=False),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied
        self.encoder = LatentEncoder(cfg)
        # training only (not exported): predicts the phrase's bag of tokens from z alone,
        # the "bag-of-words loss" (Zhao et al., 2017) that keeps z informative even when
        # the autoregressive decoder could do without it (posterior collapse)
        self.bow_head = nn.Linear(cfg.z_dim, cfg.vocab_size)
        self.apply(self._init_weights)
        # GPT-2: scaled init of the residual projections
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, idx: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(idx, mask)

    def decode(self, idx: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for tokens idx (B, T) given z (B, z_dim)."""
        _B, T = idx.shape
        if self.cfg.block_size < T:
            raise ValueError(f"sequence of {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe(pos) + tr.wz(z).unsqueeze(1)  # (B, T, C)
        x = tr.drop(x)
        for block in tr.h:
            x = block(x)
        return self.lm_head(tr.ln_f(x))

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor,
        *,
        sample: bool = True,
        whole_window: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (logits, CE, KL per latent dim (z_dim,), bag-of-tokens CE).

        The encoder reads only the second half of the window (``encoder_mask``): z then
        carries what the *coming* material is like (register, key colour, rhythm,
        density), which the decoder cannot read off its past. ``whole_window`` encodes
        the whole (short) window instead: the auxiliary short-phrase objective, where z
        is the decoder's main source of what the phrase is, so it learns to follow z.
        """
        enc = torch.ones(idx.shape, device=idx.device) if whole_window else encoder_mask(idx)
        mask = enc * (targets != -1).float()
        mu, logvar = self.encode(idx, mask)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        logits = self.decode(idx, z)
        ce = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1
        )
        kl = 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())  # (B, Z)
        bow_logp = F.log_softmax(self.bow_head(z).float(), dim=-1)  # (B, V)
        bow = -(bow_logp.gather(1, idx) * mask).sum() / mask.sum().clamp_min(1.0)
        return logits, ce, kl.mean(0), bow


def encoder_mask(idx: torch.Tensor) -> torch.Tensor:
    """(B, T) float mask selecting the second half of each window for the encoder."""
    T = idx.shape[1]
    m = torch.zeros(idx.shape, dtype=torch.float32, device=idx.device)
    m[:, T // 2 :] = 1.0
    return m


class StepModel(nn.Module):
    """The exported incremental step: (ids, z, past k/v per layer) -> (logits, present).

    Inputs: ``input_ids`` (B, T) int64, ``z`` (B, z_dim) float, then ``past_k_0,
    past_v_0, ... past_k_{L-1}, past_v_{L-1}`` each (B, nh, P, hs). Outputs: ``logits``
    (B, T, V) and ``present_k_i, present_v_i`` (B, nh, P+T, hs). One tensor per layer
    and per K/V: a stacked cache spent 30-45% of the step in Concat/Split here.
    """

    def __init__(self, model: DivergentModel) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, z: torch.Tensor, *past: torch.Tensor) -> Any:
        tr = self.m.transformer
        T = input_ids.shape[1]
        P = past[0].shape[2]
        pos = torch.arange(T, device=input_ids.device) + P
        x = tr.wte(input_ids) + tr.wpe(pos) + tr.wz(z).unsqueeze(1)
        presents: list[torch.Tensor] = []
        for i, block in enumerate(tr.h):
            x, k, v = block.step(x, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        logits = self.m.lm_head(tr.ln_f(x))
        return (logits, *presents)


class EncoderModel(nn.Module):
    """The exported encoder: (ids (B, T), mask (B, T)) -> (mu, logvar) (B, z_dim)."""

    def __init__(self, model: DivergentModel) -> None:
        super().__init__()
        self.m = model

    def forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.m.encode(input_ids, mask)
