"""``divergent bench model --json``: model speed, measured side by side in one run.

- per-token step latency at contexts 64/256/512: one decoder step on a KV cache of
  exactly that length, ONNX Runtime int8 (1 intra-op thread) through the serving
  ``IncrementalDecoder.feed`` (Python overhead included), and torch eager
  (``StepModel``) on the same weights (the bundled checkpoint), one thread each;
- 4/4 bar generation latency (sampling and grammar included), p50/p99;
- end-to-end note events generated per second.

torch is imported only here (and only if installed): the serving path never needs it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from divergent.model.files import WEIGHTS_FILE
from divergent.model.generate import Generator
from divergent.model.runtime import IncrementalDecoder, OnnxModel, default_model_dir

__all__ = ["bench_model"]

CONTEXTS = (64, 256, 512)


def _pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs)
    return {
        "p50": round(float(np.percentile(a, 50)), 4),
        "p99": round(float(np.percentile(a, 99)), 4),
    }


def _time(fn: Any, repeats: int) -> dict[str, float]:
    for _ in range(10):  # warm-up
        fn()
    ms = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1000)
    return _pct(ms)


def _torch_step(model_dir: Path) -> Any:
    """A callable (ctx) -> per-call timer for torch eager, or None without torch."""
    try:
        import torch

        from divergent.model.train import load_model
        from divergent.model.transformer import StepModel
    except ImportError:
        return None
    ckpt = model_dir / WEIGHTS_FILE
    if not ckpt.exists():
        return None
    torch.set_num_threads(1)
    model, _ = load_model(ckpt)
    step = StepModel(model).eval()
    cfg = model.cfg

    def prepare(ctx: int) -> Any:
        ids = torch.randint(0, cfg.vocab_size, (1, ctx))
        z = torch.zeros(1, cfg.z_dim)
        hs = cfg.n_embd // cfg.n_head
        empty = [torch.zeros(1, cfg.n_head, 0, hs) for _ in range(2 * cfg.n_layer)]
        with torch.inference_mode():
            out = step(ids, z, *empty)
        past = list(out[1:])
        tok = torch.randint(0, cfg.vocab_size, (1, 1))

        def run() -> None:
            with torch.inference_mode():
                step(tok, z, *past)

        return run

    return prepare


def bench_model(
    model_dir: Path | None = None, *, repeats: int = 200, bars: int = 40
) -> dict[str, Any]:
    model_dir = model_dir or default_model_dir()
    model = OnnxModel(model_dir, precision="int8", threads=1, device="cpu")
    rng = np.random.default_rng(0)
    ort_ms: dict[str, dict[str, float]] = {}
    steps: dict[int, Any] = {}
    for ctx in CONTEXTS:
        if ctx >= model.block_size:
            continue
        # the serving path: an IncrementalDecoder holding ctx tokens takes one more, then
        # is rewound to ctx, so every timed call is one token on a ctx-long cache (as torch)
        dec = IncrementalDecoder(model)
        dec.feed(rng.integers(0, model.vocab_size, ctx))
        tok = [int(rng.integers(0, model.vocab_size))]

        def ort_run(dec: IncrementalDecoder = dec, ctx: int = ctx, tok: list[int] = tok) -> None:
            dec.rewind(ctx)
            dec.feed(tok)

        steps[ctx] = ort_run
        ort_ms[str(ctx)] = _time(ort_run, repeats)
    # bar generation on the bundled example prompt (4/4), sampling and grammar included
    from divergent.model.generate import read_prompt

    example = Path(__file__).resolve().parent / "examples" / "prompt.mid"
    _, prompt_ids = read_prompt(example, model)
    gen = Generator(model)
    # one bar answered from the prompt (encode + prefill + sampling): call-and-response
    bar_ms: list[float] = []
    bar_notes = 0
    for i in range(bars):
        t = time.perf_counter()
        cont = gen.continue_ids(prompt_ids, bars=1, seed=i)
        bar_ms.append((time.perf_counter() - t) * 1000)
        bar_notes += len(cont.notes)
    # streaming: 16-bar continuations, notes per second of wall time, everything included
    notes = 0
    total_s = 0.0
    for i in range(max(1, bars // 8)):
        t = time.perf_counter()
        cont = gen.continue_ids(prompt_ids, bars=16, seed=1000 + i)
        total_s += time.perf_counter() - t
        notes += len(cont.notes)
    # the knob at d = 1: one token through every decoder an answer then runs (the base
    # decoder, two rows when the latent is pushed, and the BAD-tuned decoder), context 256
    knob = [gen.pair_decoder if gen.steering.config.latent_scale > 0 else gen.decoder]
    if gen.div_decoder is not None and gen.steering.mix_weight(1.0) > 0:
        knob.append(gen.div_decoder)
    ctx1 = 256 if model.block_size > 256 else model.block_size // 2
    ids1 = rng.integers(0, model.vocab_size, ctx1)
    for dec in knob:
        dec.reset()
        dec.feed(ids1)

    def knob_run() -> None:
        # through the generator's own feed: the diverged decoder on its worker thread
        for dec in knob:
            dec.rewind(ctx1)
        gen._feed(knob[0], knob[1] if len(knob) > 1 else None, [5])

    d1_ms = _time(knob_run, repeats)
    notes1 = 0
    total1 = 0.0
    for i in range(max(1, bars // 8)):
        t = time.perf_counter()
        cont = gen.continue_ids(prompt_ids, bars=16, seed=1000 + i, divergence=1.0)
        total1 += time.perf_counter() - t
        notes1 += len(cont.notes)
    # the readout of one 4-bar answer (surprisal, copy rate, feature distance, in-scale)
    four = gen.continue_ids(prompt_ids, bars=4, seed=7, divergence=0.5)
    readout_ms: list[float] = []
    for _ in range(100):
        t = time.perf_counter()
        gen.readout(four)
        readout_ms.append((time.perf_counter() - t) * 1000)
    # torch eager last, in the same run: once torch has run, its OpenMP threads slow
    # every other library in the process (measured: ORT 0.27 -> 0.46 ms/token), so
    # interleaving the two would charge torch's overhead to ONNX Runtime
    torch_prepare = _torch_step(model_dir)
    torch_ms: dict[str, dict[str, float]] | None = None
    if torch_prepare is not None:
        torch_ms = {str(ctx): _time(torch_prepare(ctx), repeats) for ctx in steps}
    res: dict[str, Any] = {
        "ort_int8_token_ms": ort_ms,
        "torch_token_ms": torch_ms,
        "bar_ms": _pct(bar_ms),
        "note_events_per_s": round(notes / total_s, 1),
        "token_ms_at_d1": d1_ms,
        "note_events_per_s_at_d1": round(notes1 / total1, 1),
        "decoders_at_d1": len(knob),
        "readout_ms": _pct(readout_ms),
        "readout_notes": len(four.notes),
    }
    if torch_ms:
        res["speedup_vs_torch_256"] = round(torch_ms["256"]["p50"] / ort_ms["256"]["p50"], 2)
    res["notes_per_bar"] = round(bar_notes / bars, 2)
    res["note_events_counted_as"] = "notes (one note = its on/off pair)"
    return res
