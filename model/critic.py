"""The domain critic: a small classifier of the corpus's own collections, over token phrases.

Divergence (and its bound) is measured in the critic's feature space, as the divergence
maximisation work does with a frozen domain classifier (``../shared/notes/seeds.md``):
its **logits** are the features φ. The classes are the training corpus's collections
as ``divergent data build`` records them per work (``manifest.json``: Bach chorales,
Palestrina, Essen folksongs, the Irish and Scottish tune books, …); collections with
too few training works to learn are merged into one ``other`` class.

The network reads a phrase as a sequence of token *distributions* (B, T, V): a one-hot
row for a real token, a softmax row for a generator's expected token. Its first layer is
a matrix product with a learned token embedding, so the same frozen critic scores real
phrases and gives BAD fine-tuning a gradient path through soft tokens. Then two 1-D
convolutions (a few notes of context each), mean- and max-pooling over time, and a
linear head.

Training (``divergent critic train``) samples class-balanced phrases of the training
split (transposed, like the generator's training), reports held-out accuracy on the
validation split (split by work, never by window) and its confusion matrix, and writes
``critic.pt`` (torch, for BAD) and ``critic.onnx`` (torch-free evaluation).
torch is imported only by the training functions.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from divergent.model.configs import StrictConfig
from divergent.model.data import DatasetFiles, load_split, transpose_ids
from divergent.model.files import CRITIC_CARD_FILE, CRITIC_ONNX_FILE, CRITIC_PT_FILE
from divergent.model.tokenizer import load_tokenizer

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "CriticConfig",
    "OnnxCritic",
    "PhraseBank",
    "class_of_works",
    "mmd2",
    "train_critic",
]

#: tokens in a critic phrase: about four bars of REMI (25-33 tokens a 4/4 bar)
PHRASE_TOKENS = 128
OTHER = "other"


@dataclass(frozen=True)
class CriticConfig(StrictConfig):
    config_name: ClassVar[str] = "critic options"
    data: str = "data/dataset"
    out: str = "runs/critic"
    phrase_tokens: int = PHRASE_TOKENS
    min_works: int = 100  # a collection with fewer training works joins "other"
    embd: int = 64
    channels: int = 128
    kernel: int = 5
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    transpose: int = 5
    val_phrases_per_work: int = 2
    threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.phrase_tokens < 16 or self.kernel < 1 or self.steps < 1:
            raise ValueError("phrase_tokens >= 16, kernel >= 1, steps >= 1")
        if not 0.0 < self.lr < 1.0 or self.batch_size < 2:
            raise ValueError("need 0 < lr < 1 and batch_size >= 2")


def class_of_works(root: str | Path, min_works: int) -> tuple[list[str], dict[str, list[int]]]:
    """(class names, per split the class index of each converted work, in token order).

    The order of converted works in the manifest is the order of their tokens in
    ``<split>.bin`` (``build_dataset`` writes both from one sorted list).
    """
    manifest = json.loads(DatasetFiles(Path(root)).manifest.read_text())
    works = [w for w in manifest["works"] if "split" in w]
    train_count = Counter(w["source"] for w in works if w["split"] == "train")
    big = sorted(s for s, n in train_count.items() if n >= min_works)
    classes = [*big, OTHER] if len(big) < len(train_count) else big
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, list[int]] = {"train": [], "val": []}
    for w in works:
        out[w["split"]].append(index.get(w["source"], index.get(OTHER, 0)))
    return classes, out


class PhraseBank:
    """Phrases of a split with their class: windows that start at a bar line."""

    def __init__(self, root: str | Path, split: str, classes: list[int], phrase_tokens: int):
        self.ids, offsets = load_split(root, split)
        vocab = load_tokenizer(DatasetFiles(Path(root)).tokenizer).vocab
        self.vocab = vocab
        self.T = phrase_tokens
        self.works: list[tuple[int, int]] = []  # (start, end) of each work, BOS/EOS cut
        self.labels: list[int] = []
        self.bar_starts: list[np.ndarray] = []
        if len(classes) != len(offsets) - 1:
            raise ValueError(f"{len(classes)} labels for {len(offsets) - 1} works in {split}")
        for (a, b), c in zip(itertools.pairwise(offsets), classes, strict=True):
            a, b = int(a) + 1, int(b) - 1
            bars = a + np.flatnonzero(self.ids[a:b] == vocab.bar)
            bars = bars[bars + phrase_tokens <= b]
            if len(bars) == 0:
                continue  # shorter than one phrase
            self.works.append((a, b))
            self.labels.append(c)
            self.bar_starts.append(bars)
        self.by_class: dict[int, list[int]] = {}
        for w, c in enumerate(self.labels):
            self.by_class.setdefault(c, []).append(w)

    def phrase(self, work: int, rng: np.random.Generator, transpose: int = 0) -> np.ndarray:
        s = int(rng.choice(self.bar_starts[work]))
        w = self.ids[s : s + self.T].astype(np.int64)
        if transpose:
            k = int(rng.integers(-transpose, transpose + 1))
            shifted = transpose_ids(w, k, self.vocab)
            w = shifted if shifted is not None else w
        return w

    def balanced(
        self, n: int, rng: np.random.Generator, transpose: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` phrases, classes drawn uniformly, then a work, then a bar line."""
        cls = sorted(self.by_class)
        ys = rng.choice(cls, size=n)
        xs = [self.phrase(int(rng.choice(self.by_class[int(y)])), rng, transpose) for y in ys]
        return np.stack(xs), ys.astype(np.int64)

    def of_class(self, c: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` phrases of class ``c`` (works drawn uniformly within the class)."""
        ws = rng.choice(self.by_class[c], size=n)
        return np.stack([self.phrase(int(w), rng) for w in ws])

    def anywhere(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` phrases of the whole data: works drawn in proportion to their bar lines."""
        sizes = np.array([len(b) for b in self.bar_starts], float)
        ws = rng.choice(len(sizes), size=n, p=sizes / sizes.sum())
        return np.stack([self.phrase(int(w), rng) for w in ws])

    def references(
        self, n: int, rng: np.random.Generator
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """The real references divergence is measured against (BAD training and the
        evaluation alike): ``n`` phrases per class, and as many phrases as all classes'
        together drawn anywhere in the split (the whole data, each collection in its share).
        """
        per = {c: self.of_class(c, n, rng) for c in sorted(self.by_class)}
        return per, self.anywhere(n * len(per), rng)

    def fixed(self, per_work: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Deterministic phrases of every work (held-out evaluation)."""
        rng = np.random.default_rng(seed)
        xs, ys = [], []
        for w, c in enumerate(self.labels):
            for _ in range(per_work):
                xs.append(self.phrase(w, rng))
                ys.append(c)
        return np.stack(xs), np.array(ys, np.int64)


def build_critic_net(vocab_size: int, n_classes: int, cfg: CriticConfig) -> torch.nn.Module:
    """The critic network (torch); see the module docstring."""
    import torch
    from torch import nn

    class Critic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Parameter(torch.randn(vocab_size, cfg.embd) * 0.05)
            pad = cfg.kernel // 2
            self.conv1 = nn.Conv1d(cfg.embd, cfg.channels, cfg.kernel, padding=pad)
            self.conv2 = nn.Conv1d(cfg.channels, cfg.channels, cfg.kernel, padding=pad)
            self.head = nn.Linear(2 * cfg.channels, n_classes)

        def forward_soft(self, probs: torch.Tensor) -> torch.Tensor:
            """Logits (B, C) of phrases given as token distributions (B, T, V)."""
            x = (probs @ self.emb).transpose(1, 2)  # (B, E, T)
            x = torch.nn.functional.gelu(self.conv1(x))
            x = torch.nn.functional.gelu(self.conv2(x)) + x  # (B, H, T)
            pooled = torch.cat([x.mean(-1), x.amax(-1)], dim=-1)  # (B, 2H)
            return self.head(pooled)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            """Logits (B, C) of phrases of token ids (B, T)."""
            return self.forward_soft(torch.nn.functional.one_hot(ids, vocab_size).float())

    return Critic()


def load_critic(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The frozen critic (eval mode, no gradients) and its card from ``critic.pt``."""
    import torch

    blob = torch.load(Path(path), map_location="cpu", weights_only=False)
    cfg = CriticConfig.from_dict(blob["config"])
    net = build_critic_net(int(blob["vocab_size"]), len(blob["classes"]), cfg)
    net.load_state_dict(blob["state"])
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, blob


def _confusion(y: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), np.int64)
    np.add.at(m, (y, pred), 1)
    return m


def train_critic(cfg: CriticConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate on held-out works, write ``critic.pt``/``critic.onnx``/``critic.json``."""
    import torch
    from tqdm import tqdm

    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    classes, labels = class_of_works(cfg.data, cfg.min_works)
    train = PhraseBank(cfg.data, "train", labels["train"], cfg.phrase_tokens)
    val = PhraseBank(cfg.data, "val", labels["val"], cfg.phrase_tokens)
    V = train.vocab.size
    net = build_critic_net(V, len(classes), cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.01)
    rng = np.random.default_rng(cfg.seed)
    bar = tqdm(range(cfg.steps), desc="critic", disable=not progress)
    for step in bar:
        lr = cfg.lr * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = train.balanced(cfg.batch_size, rng, cfg.transpose)
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    net.eval()
    xv, yv = val.fixed(cfg.val_phrases_per_work, seed=cfg.seed)
    with torch.no_grad():
        pred = np.concatenate(
            [
                net(torch.from_numpy(xv[i : i + 256])).argmax(-1).numpy()
                for i in range(0, len(xv), 256)
            ]
        )
    conf = _confusion(yv, pred, len(classes))
    per_class = conf.diagonal() / np.maximum(conf.sum(1), 1)
    present = conf.sum(1) > 0
    card: dict[str, Any] = {
        "classes": classes,
        "train_works": {c: len(train.by_class.get(i, [])) for i, c in enumerate(classes)},
        "val_works": {c: len(val.by_class.get(i, [])) for i, c in enumerate(classes)},
        "val_phrases": len(yv),
        "val_accuracy": round(float((pred == yv).mean()), 4),
        "val_balanced_accuracy": round(float(per_class[present].mean()), 4),
        "chance_balanced_accuracy": round(1.0 / int(present.sum()), 4),
        "val_recall_per_class": {
            c: round(float(r), 3) for c, r in zip(classes, per_class, strict=True)
        },
        "confusion": conf.tolist(),
        "params": sum(p.numel() for p in net.parameters()),
        "seconds": round(time.perf_counter() - t0, 1),
        "config": cfg.to_dict(),
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_hash = load_tokenizer(DatasetFiles(Path(cfg.data)).tokenizer).hash
    torch.save(
        {
            "state": net.state_dict(),
            "config": cfg.to_dict(),
            "classes": classes,
            "vocab_size": V,
            "tokenizer_hash": tok_hash,
            "card": card,
        },
        out / CRITIC_PT_FILE,
    )
    export_critic_onnx(net, V, out / CRITIC_ONNX_FILE, cfg.phrase_tokens)
    (out / CRITIC_CARD_FILE).write_text(json.dumps(card, indent=1))
    return card


def export_critic_onnx(net: torch.nn.Module, vocab_size: int, path: Path, T: int) -> None:
    """``critic.onnx``: (input_ids (B, T) int64) -> logits (B, C), dynamic B and T."""
    import torch

    ids = torch.zeros((2, T), dtype=torch.int64)
    with warnings.catch_warnings():
        # the legacy TorchScript exporter warns that it is deprecated; it exports this
        # small graph in well under a second with identical numerics (as the encoder's)
        warnings.simplefilter("ignore")
        _export(net, ids, path)


def _export(net: torch.nn.Module, ids: torch.Tensor, path: Path) -> None:
    import torch

    torch.onnx.export(
        net,
        (ids,),
        str(path),
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_axes={"input_ids": {0: "B", 1: "T"}, "logits": {0: "B"}},
        opset_version=17,
        dynamo=False,
    )


def mmd2(x: np.ndarray, y: np.ndarray, sigma: float = 1.0) -> float:
    """Biased squared MMD of feature sets (N, D), (M, D) under BAD's kernel (numpy twin of
    ``model.bad.mmd2``): a per-dimension Gaussian ``exp(-(x - y)^2 / sigma)`` summed over D."""

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.exp(-((a[:, None, :] - b[None, :, :]) ** 2) / sigma).sum(-1).mean())

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return k(x, x) + k(y, y) - 2 * k(x, y)


class OnnxCritic:
    """The frozen critic without torch: phrase features (its logits) for evaluation."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime as ort

        path = Path(path)
        card = json.loads((path.parent / CRITIC_CARD_FILE).read_text())
        self.classes: list[str] = list(card["classes"])
        self.phrase_tokens = int(card["config"]["phrase_tokens"])
        self.min_works = int(card["config"]["min_works"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def features(self, phrases: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Logits (N, C) of token phrases (each cut to the critic's phrase length).

        Pooling over time makes the critic length-agnostic, so each phrase is scored at
        its own length rather than padded with tokens it never had.
        """
        T = self.phrase_tokens
        out = np.zeros((len(phrases), len(self.classes)), np.float32)
        for i, p in enumerate(phrases):
            x = np.asarray(p, np.int64)[None, :T]
            out[i] = self.session.run(["logits"], {"input_ids": x})[0][0]
        return out
