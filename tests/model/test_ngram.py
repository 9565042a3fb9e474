"""Tests for model.ngram: the vectorised modified Kneser–Ney model against a dict reference."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from divergent.model.ngram import MIN_DISCOUNT, KneserNeyLM, select_order


class RefKN:
    """Interpolated modified Kneser–Ney, written straight from the definitions (slow)."""

    def __init__(self, seq: list[int], order: int, vocab_size: int) -> None:
        self.order, self.v = order, vocab_size
        self.counts: dict[int, Counter[tuple[int, ...]]] = {}
        top: Counter[tuple[int, ...]] = Counter()
        for i in range(len(seq) - order + 1):
            top[tuple(seq[i : i + order])] += 1
        self.counts[order] = top
        for n in range(1, order):
            left: defaultdict[tuple[int, ...], set[int]] = defaultdict(set)
            for i in range(len(seq) - n):
                left[tuple(seq[i + 1 : i + 1 + n])].add(seq[i])
            self.counts[n] = Counter({g: len(s) for g, s in left.items()})
        self.disc: dict[int, tuple[float, float, float]] = {}
        for n, c in self.counts.items():
            nk = Counter(c.values())
            n1, n2, n3, n4 = nk[1], nk[2], nk[3], nk[4]
            y = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.0
            d1 = 1 - 2 * y * n2 / n1 if n1 else 0.0
            d2 = 2 - 3 * y * n3 / n2 if n2 else 2.0
            d3 = 3 - 4 * y * n4 / n3 if n3 else 3.0
            self.disc[n] = (max(d1, MIN_DISCOUNT), max(d2, MIN_DISCOUNT), max(d3, MIN_DISCOUNT))

    def _d(self, n: int, c: int) -> float:
        return 0.0 if c == 0 else self.disc[n][min(c, 3) - 1]

    def prob(self, w: int, ctx: tuple[int, ...]) -> float:
        ctx = ctx[max(0, len(ctx) - (self.order - 1)) :] if self.order > 1 else ()
        n = len(ctx) + 1
        lower = 1.0 / self.v if n == 1 else self.prob(w, ctx[1:])
        c = self.counts[n]
        follow = [c[(*ctx, u)] for u in range(self.v)]
        total = sum(follow)
        if total == 0:
            return lower
        gamma = sum(self._d(n, f) for f in follow)
        return (max(follow[w] - self._d(n, follow[w]), 0.0) + gamma * lower) / total


def markov_stream(
    rng: np.random.Generator, vocab: int, n_tokens: int, branching: int, ctx_len: int = 1
) -> np.ndarray:
    """A Markov chain of order ``ctx_len`` where each state has ``branching`` successors."""
    succ = rng.integers(0, vocab, size=(vocab**ctx_len, branching))
    probs = rng.dirichlet(np.ones(branching), size=vocab**ctx_len)
    out = list(rng.integers(0, vocab, size=ctx_len))
    for _ in range(n_tokens - ctx_len):
        state = 0
        for t in out[-ctx_len:]:
            state = state * vocab + t
        out.append(int(succ[state, rng.choice(branching, p=probs[state])]))
    return np.array(out, dtype=np.uint16)


@pytest.fixture(scope="module")
def small() -> tuple[np.ndarray, np.ndarray, KneserNeyLM]:
    """(train, held-out, model of order 4 fitted on train) from one sparse Markov chain."""
    rng = np.random.default_rng(0)
    ids = markov_stream(rng, vocab=12, n_tokens=3400, branching=4)
    return ids[:3000], ids[3000:], KneserNeyLM(order=4, vocab_size=12).fit(ids[:3000])


def test_prob_dist_sums_to_one(small: tuple[np.ndarray, np.ndarray, KneserNeyLM]) -> None:
    ids, _, lm = small
    contexts: list[list[int]] = [
        [],
        [int(ids[0])],
        [int(t) for t in ids[10:12]],
        [int(t) for t in ids[100:103]],
        [int(t) for t in ids[200:220]],  # longer than order - 1
        [11, 11, 11],  # most likely unseen
        [0, 1, 2, 3, 4, 5],
    ]
    for ctx in contexts:
        p = lm.prob_dist(ctx)
        assert p.shape == (12,)
        assert np.all(p > 0)
        assert abs(p.sum() - 1.0) <= 1e-9


def test_logprobs_match_prob_dist(small: tuple[np.ndarray, np.ndarray, KneserNeyLM]) -> None:
    _, held, lm = small
    lp = lm.logprobs(held)
    assert lp.dtype == np.float64 and lp.shape == held.shape
    assert np.isnan(lp[0])
    assert np.all(np.isfinite(lp[1:]))
    for i in [1, 2, 3, 4, *range(5, 400, 7)]:
        ctx = held[max(0, i - lm.order + 1) : i].tolist()
        assert lp[i] == pytest.approx(math.log(lm.prob_dist(ctx)[held[i]]), abs=1e-12)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_matches_reference(order: int) -> None:
    rng = np.random.default_rng(order)
    vocab = 7
    train = rng.integers(0, vocab - 1, size=400).astype(np.uint16)
    train[::9] = 0  # a recurring "BOS" gives some higher counts
    train[0] = vocab - 1  # a token seen only at the stream start: no left extension
    held = rng.integers(0, vocab, size=120).astype(np.uint16)
    lm = KneserNeyLM(order=order, vocab_size=vocab).fit(train)
    ref = RefKN(train.tolist(), order, vocab)
    for n in range(1, order + 1):
        assert lm.discounts[n - 1] == pytest.approx(ref.disc[n], abs=1e-12)
    lp = lm.logprobs(held)
    for i in range(1, held.size):
        ctx = tuple(held[max(0, i - order + 1) : i].tolist())
        assert lp[i] == pytest.approx(math.log(ref.prob(int(held[i]), ctx)), abs=1e-9)
    for ctx in [(), (3,), (1, 2, 3), (6, 6, 6, 6)]:
        want = [ref.prob(w, ctx) for w in range(vocab)]
        np.testing.assert_allclose(lm.prob_dist(list(ctx)), want, rtol=0, atol=1e-9)


def test_low_entropy_chain_is_learned() -> None:
    rng = np.random.default_rng(3)
    vocab = 40
    ids = markov_stream(rng, vocab=vocab, n_tokens=24_000, branching=2, ctx_len=2)
    train, val = ids[:20_000], ids[20_000:]

    def nll(order: int) -> float:
        lm = KneserNeyLM(order=order, vocab_size=vocab).fit(train)
        return float(-np.mean(lm.logprobs(val)[1:]))

    n1, n2, n3 = nll(1), nll(2), nll(3)
    assert n3 < 0.5 * math.log(vocab)
    assert n3 < n2 - 0.3
    assert n2 < n1 - 0.3
    assert n3 < math.log(2) + 0.15  # at most two successors per state


def test_select_order_returns_argmin() -> None:
    rng = np.random.default_rng(4)
    ids = markov_stream(rng, vocab=20, n_tokens=12_000, branching=3, ctx_len=2)
    train, val = ids[:10_000], ids[10_000:]
    lm, nll = select_order(train, val, vocab_size=20, orders=(1, 2, 3, 4))
    assert set(nll) == {1, 2, 3, 4}
    assert lm.order == min(nll, key=nll.__getitem__)
    assert lm.order >= 3
    assert nll[lm.order] == pytest.approx(float(-np.mean(lm.logprobs(val)[1:])), abs=1e-12)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        KneserNeyLM(order=8, vocab_size=411)
    lm = KneserNeyLM(order=3, vocab_size=5)
    with pytest.raises(RuntimeError):
        lm.logprobs(np.array([1, 2], dtype=np.uint16))
    with pytest.raises(ValueError):
        lm.fit(np.array([1, 5, 2], dtype=np.uint16))
    with pytest.raises(ValueError):
        lm.fit(np.array([1, 2], dtype=np.uint16))
    lm.fit(np.array([0, 1, 2, 3, 4, 0, 1], dtype=np.uint16))
    with pytest.raises(ValueError):
        lm.prob_dist([7])
