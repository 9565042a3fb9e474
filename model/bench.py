"""``divergent bench model --json``: model speed, measured side by side in one run.

- per-token step latency at contexts 64/256/512: one decoder step on a KV cache of
  exactly that length, ONNX Runtime int8 (1 intra-op thread) through the serving
  ``IncrementalDecoder.feed`` (Python overhead included), and torch eager
  (``StepModel``) on the same weights (the bundled checkpoint), one thread each;
- prefill latency (``prefill_ms``: 32, 128 and 384 tokens at once on an emptied cache),
  the int8 file and the served pair (``OnnxModel(prefill=...)``) timed in turns;
- 4/4 bar generation latency (sampling and grammar included), p50/p99;
- end-to-end note events generated per second;
- the decoder variant and threads this host serves with (``model.host.choose_decoder``,
  measured afresh and cached) and its per-token latency (``auto_token_ms``);
- the floor: the host's multiply-add rate on the step's own shapes (one ONNX Runtime
  fp32 MatMul chain of every matrix a step multiplies by, attention over the context's
  K and V included, one thread), and ``floor_ratio`` = the served step's p50 at context
  256 / the chain's p50, a figure that compares across machines where absolute times
  do not (issue 13: the same step was 3x slower on another Xeon of the same kind);
- the bytes floor: the bytes the served step reads (its weights as stored and the K/V
  cache at context 256, ``step_bytes``) at the rate the chain moved its own, and
  ``bytes_floor_ratio`` = the served step's p50 / that time. An int8 step reads about
  0.4 of the chain's bytes (6.2 against 15.2 MB for the bundled model at 256), so
  ``floor_ratio`` can fall under 1 while the step still runs at half the host's memory
  rate; this ratio says how far it is.

Figures after the step timings (bars, notes/s, the knob) run the chosen variant.
torch is imported only here (and only if installed): the serving path never needs it.

With a learned concept (``concept="riff"``, ``--concept riff``): the same figures for
the concept's generator, built as the server builds it (deltas added, weights
re-quantized, its own decoder session), measured beside the base model's in the same
run, with their ratios (``"concept"``; null without one).

With ``device="cuda"`` (``--device cuda``) the served model is the fp32 decoder on the
GPU (``model.host.choose_decoder``: nothing raced), and ``auto_token_ms`` and every
figure after the step timings are the GPU's; ``ort_int8_token_ms``, the floor and torch
stay the CPU's, for comparison (``floor_ratio``, a CPU figure, is then left out). A host
that cannot run cuda is refused (DeviceError) before anything is measured.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from divergent.model.files import WEIGHTS_FILE
from divergent.model.generate import Generator
from divergent.model.host import choose_decoder, cpu_model
from divergent.model.runtime import (
    IncrementalDecoder,
    OnnxModel,
    check_device,
    default_model_dir,
    session_options,
)

__all__ = [
    "bench_model",
    "chain_bytes",
    "concept_figures",
    "floor_chain",
    "step_bytes",
    "step_macs",
]

CONTEXTS = (64, 256, 512)
#: prompt lengths whose prefill is timed (a bar or two, a phrase, a long context)
PREFILLS = (32, 128, 384)
#: the context the headline figures (speed-up, floor ratio) are taken at
FLOOR_CONTEXT = 256


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


def _interleaved(runs: dict[str, Any], repeats: int) -> dict[str, dict[str, float]]:
    """p50/p99 (ms) per named callable, run in turns: a burst of load hits them alike."""
    for fn in runs.values():
        fn()  # warm-up
    ms: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            ms[name].append((time.perf_counter() - t) * 1000)
    return {name: _pct(xs) for name, xs in ms.items()}


def _step_shapes(model: OnnxModel, ctx: int) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(name, input shape, weight shape) of every product one decoder step computes."""
    d, V, Z = model.n_head * model.head_size, model.vocab_size, model.z_dim
    H, hs = model.n_head, model.head_size
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = [("wz", (1, Z), (Z, d))]
    for i in range(model.n_layer):
        shapes += [
            (f"c_attn_{i}", (1, d), (d, 3 * d)),
            (f"qk_{i}", (H, 1, hs), (H, hs, ctx)),  # scores over the cached keys
            (f"pv_{i}", (H, 1, ctx), (H, ctx, hs)),  # weighted sum of the cached values
            (f"attn_proj_{i}", (1, d), (d, d)),
            (f"c_fc_{i}", (1, d), (d, 4 * d)),
            (f"mlp_proj_{i}", (1, 4 * d), (4 * d, d)),
        ]
    return [*shapes, ("lm_head", (1, d), (d, V))]


def step_macs(model: OnnxModel, ctx: int) -> int:
    """Multiply-adds of one decoder step (batch 1) on a cache of ``ctx`` tokens."""
    return sum(int(np.prod(x[:-1])) * int(np.prod(w[-2:])) for _, x, w in _step_shapes(model, ctx))


def chain_bytes(model: OnnxModel, ctx: int) -> int:
    """Bytes the floor's MatMul chain reads at ``ctx``: every operand, in float32."""
    return 4 * sum(int(np.prod(x)) + int(np.prod(w)) for _, x, w in _step_shapes(model, ctx))


def step_bytes(model: OnnxModel, ctx: int) -> int:
    """Bytes one decoder step (batch 1) reads at ``ctx``: the served decoder file's
    weights as stored (a table read through Gather or Slice, the token and position
    embeddings, counts one row) and the K/V cache of ``ctx`` tokens.

    A step multiplies every weight once and reads the whole cache once, so on a host
    where they do not stay in the core's own cache between steps this many bytes cross
    from the shared cache or memory every token (the step is memory-bound: measured op
    by op, MatMulNBits' time follows its weight bytes at 14-17 GB/s, MODEL_CARD.md).
    """
    import onnx
    from onnx import helper

    graph = onnx.load(str(model.files.decoder(model.precision))).graph
    lookups = {n.input[0] for n in graph.node if n.op_type in ("Gather", "Slice")}
    others = {i for n in graph.node if n.op_type not in ("Gather", "Slice") for i in n.input}
    total = 0
    for t in graph.initializer:
        item = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        dims = list(t.dims)
        read = dims[1:] if t.name in lookups and t.name not in others and dims else dims
        total += int(np.prod(read)) * item
    cache = model.n_layer * 2 * model.n_head * ctx * model.head_size
    return total + cache * np.dtype(model.cache_type).itemsize


def floor_chain(model: OnnxModel, ctx: int) -> Any:
    """A callable running the step's products once: an fp32 MatMul chain, one ORT thread.

    One graph of ONNX Runtime MatMuls, each of a step's shapes (random weights, the
    sizes of the model's matrices and of its K/V cache at ``ctx``), outputs bound to
    fixed buffers: the host's GEMV rate on exactly the work a step multiplies, with no
    LayerNorm, attention softmax, cache update or Python between them.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f32 = TensorProto.FLOAT
    inputs, outputs, nodes, inits = [], [], [], []
    feeds: dict[str, np.ndarray] = {}
    outs: dict[str, np.ndarray] = {}
    for name, xs, ws in _step_shapes(model, ctx):
        x = rng.standard_normal(xs).astype(np.float32)
        w = (rng.standard_normal(ws) / np.sqrt(ws[-2])).astype(np.float32)
        inputs.append(helper.make_tensor_value_info(f"{name}_x", f32, list(xs)))
        inits.append(numpy_helper.from_array(w, f"{name}_w"))
        nodes.append(helper.make_node("MatMul", [f"{name}_x", f"{name}_w"], [f"{name}_y"]))
        y = np.zeros((*xs[:-1], ws[-1]), np.float32)
        outputs.append(helper.make_tensor_value_info(f"{name}_y", f32, list(y.shape)))
        feeds[f"{name}_x"], outs[f"{name}_y"] = x, y
    graph = helper.make_graph(nodes, "floor", inputs, outputs, inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx_model.ir_version = 10
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"]
    )
    io = session.io_binding()
    as_value = ort.OrtValue.ortvalue_from_numpy
    for n, a in feeds.items():
        io.bind_ortvalue_input(n, as_value(a))
    for n, a in outs.items():
        io.bind_ortvalue_output(n, as_value(a))

    def run() -> None:
        session.run_with_iobinding(io)

    return run


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


def _step_timer(model: OnnxModel, ctx: int, rng: np.random.Generator) -> Any:
    """One token on a ctx-long cache through the serving ``IncrementalDecoder.feed``.

    The decoder holds ctx tokens, takes one more, then is rewound to ctx: every timed
    call is one token on a cache of exactly ctx tokens (as torch's).
    """
    dec = IncrementalDecoder(model)
    dec.feed(rng.integers(0, model.vocab_size, ctx))
    tok = [int(rng.integers(0, model.vocab_size))]

    def run() -> None:
        dec.rewind(ctx)
        dec.feed(tok)

    return run


def _prefill_timer(model: OnnxModel, n: int, rng: np.random.Generator) -> Any:
    """A prefill of ``n`` tokens on an emptied cache, through the serving ``feed``."""
    dec = IncrementalDecoder(model)
    ids = rng.integers(0, model.vocab_size, n)
    dec.feed(ids)  # untimed: the first run of a new length allocates

    def run() -> None:
        dec.reset()
        dec.feed(ids)

    return run


def _streamed(gen: Generator, prompt_ids: Any, runs: int, divergence: float = 0.0) -> float:
    """Notes per second of wall time over 16-bar continuations, everything included."""
    notes = 0
    total_s = 0.0
    for i in range(runs):
        t = time.perf_counter()
        cont = gen.continue_ids(prompt_ids, bars=16, seed=1000 + i, divergence=divergence)
        total_s += time.perf_counter() - t
        notes += len(cont.notes)
    return round(notes / total_s, 1)


def _bar_ms(gen: Generator, prompt_ids: Any, bars: int) -> tuple[list[float], int]:
    """One bar answered from the prompt, ``bars`` times: (ms each, notes in all)."""
    bar_ms: list[float] = []
    notes = 0
    for i in range(bars):
        t = time.perf_counter()
        cont = gen.continue_ids(prompt_ids, bars=1, seed=i)
        bar_ms.append((time.perf_counter() - t) * 1000)
        notes += len(cont.notes)
    return bar_ms, notes


def concept_figures(
    base: Generator,
    spec: str,
    concepts_dir: Path | None,
    prompt_ids: Any,
    *,
    repeats: int,
    bars: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """The base model's figures and a concept's, measured one after the other in this
    run (per-token at the headline context, bar latency, note events/s at d = 0 and 1),
    and the concept's ratio to the base for each. The concept's generator is built as
    the server's concept loader builds it (``server.concepts``)."""
    from divergent.model.concept import BaseWeights, activate
    from divergent.model.generate import PROMPT_TOKENS

    model = base.model
    t = time.perf_counter()
    active = activate(spec, model, concepts_dir, base=BaseWeights(model.files.root, model.n_layer))
    gen = Generator(model, concept=active, like=base)
    gen.warm_prefill(PROMPT_TOKENS)
    build_ms = (time.perf_counter() - t) * 1000
    ctx = FLOOR_CONTEXT if model.block_size > FLOOR_CONTEXT else model.block_size // 2
    runs = max(1, bars // 8)
    figures: dict[str, dict[str, Any]] = {}
    for who, g in (("base", base), ("concept", gen)):
        bar_ms, _ = _bar_ms(g, prompt_ids, bars)
        figures[who] = {
            "token_ms": _time(_step_timer(g.model, ctx, rng), repeats),
            "bar_ms": _pct(bar_ms),
            "note_events_per_s": _streamed(g, prompt_ids, runs),
            "note_events_per_s_at_d1": _streamed(g, prompt_ids, runs, divergence=1.0),
        }
    b, c = figures["base"], figures["concept"]
    return {
        "spec": gen.concept.spec if gen.concept is not None else spec,
        "context": ctx,
        "build_ms": round(build_ms, 1),
        **figures,
        "ratio_concept_vs_base": {
            "token_ms_p50": round(c["token_ms"]["p50"] / b["token_ms"]["p50"], 2),
            "bar_ms_p99": round(c["bar_ms"]["p99"] / b["bar_ms"]["p99"], 2),
            "note_events_per_s": round(c["note_events_per_s"] / b["note_events_per_s"], 2),
            "note_events_per_s_at_d1": round(
                c["note_events_per_s_at_d1"] / b["note_events_per_s_at_d1"], 2
            ),
        },
    }


def bench_model(
    model_dir: Path | None = None,
    *,
    repeats: int = 200,
    bars: int = 40,
    cache_dir: Path | None = None,
    device: str = "cpu",
    concept: str | None = None,
    concepts_dir: Path | None = None,
) -> dict[str, Any]:
    """Every figure above, as one JSON-able dict (``divergent bench model --json``).

    ``cache_dir`` is where the host's decoder choice is cached (default: the user's).
    ``device``: where the served model runs (see above). ``concept``: a learned concept
    (``A`` or ``A+B``, in ``concepts_dir``) measured beside the base model.
    """
    import onnxruntime as ort

    check_device(device)  # refused before anything is measured
    if concept is not None:
        from divergent.model.concept import load_concept, parse_spec

        for name in parse_spec(concept):  # so is a concept that is not there
            load_concept(name, concepts_dir)
    model_dir = model_dir or default_model_dir()
    if device == "cpu":
        # the host's choice, measured afresh (the bench reports this run's reasons) and
        # cached, so that serve then runs what was measured here
        choice = choose_decoder(model_dir, "auto", cache_dir=cache_dir, refresh=True)
    else:
        choice = choose_decoder(model_dir, "auto", device=device)
    model = OnnxModel(model_dir, precision="int8", threads=1, device="cpu")
    served = model
    served_as = (choice.variant, choice.threads, choice.device, choice.prefill_variant)
    if served_as != ("int8", 1, "cpu", "int8"):
        served = choice.load(model_dir)
    rng = np.random.default_rng(0)
    contexts = [ctx for ctx in CONTEXTS if ctx < model.block_size]
    ort_ms = {str(ctx): _time(_step_timer(model, ctx, rng), repeats) for ctx in contexts}
    auto_ms = ort_ms
    if served is not model:
        auto_ms = {str(ctx): _time(_step_timer(served, ctx, rng), repeats) for ctx in contexts}
    # prefills (a prompt at once), the int8 file and the served pair interleaved
    prefill_ms: dict[str, dict[str, dict[str, float]]] = {}
    for n in (n for n in PREFILLS if n < model.block_size):
        runs = {"int8": _prefill_timer(model, n, rng), "served": _prefill_timer(served, n, rng)}
        prefill_ms[str(n)] = _interleaved(runs, max(10, repeats // 10))
    # the floor, in the same run: the step's products alone, at the headline context
    floor_ctx = FLOOR_CONTEXT if model.block_size > FLOOR_CONTEXT else contexts[-1]
    floor = _time(floor_chain(model, floor_ctx), repeats)
    macs = step_macs(model, floor_ctx)
    moved = chain_bytes(model, floor_ctx)
    served_bytes = step_bytes(served, floor_ctx)
    model = served
    # bar generation on the bundled example prompt (4/4), sampling and grammar included
    from divergent.model.generate import read_prompt

    example = Path(__file__).resolve().parent / "examples" / "prompt.mid"
    _, prompt_ids = read_prompt(example, model)
    gen = Generator(model)
    # one bar answered from the prompt (encode + prefill + sampling): call-and-response
    bar_ms, bar_notes = _bar_ms(gen, prompt_ids, bars)
    # streaming: 16-bar continuations, notes per second of wall time, everything included
    note_events_per_s = _streamed(gen, prompt_ids, max(1, bars // 8))
    # the knob at d = 1: one token through every decoder an answer then runs, context 256,
    # as continue_ids picks them: two base rows when the latent is pushed and the answer's
    # logits still use the base decoder's (w(1) < 1), beside the BAD-tuned decoder; at
    # w(1) = 1 the BAD-tuned decoder alone (the readout's base row reads the answer beside
    # it, in chunks on the worker thread: in note_events_per_s_at_d1, not here)
    w1 = gen.steering.mix_weight(1.0) if gen.div_decoder is not None else 0.0
    pair = gen.steering.config.latent_scale > 0 and w1 != 1.0
    knob = [gen.pair_decoder if pair else gen.decoder]
    if gen.div_decoder is not None and gen.diverged_alone(w1):
        knob = [gen.div_decoder]
    elif gen.div_decoder is not None and w1 > 0:
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
    note_events_per_s_at_d1 = _streamed(gen, prompt_ids, max(1, bars // 8), divergence=1.0)
    # the readout of one 4-bar answer (surprisal, copy rate, feature distance, in-scale)
    four = gen.continue_ids(prompt_ids, bars=4, seed=7, divergence=0.5)
    readout_ms: list[float] = []
    for _ in range(100):
        t = time.perf_counter()
        gen.readout(four)
        readout_ms.append((time.perf_counter() - t) * 1000)
    concept_res = None
    if concept is not None:
        concept_res = concept_figures(
            gen, concept, concepts_dir, prompt_ids, repeats=repeats, bars=bars, rng=rng
        )
    # torch eager last, in the same run: once torch has run, its OpenMP threads slow
    # every other library in the process (measured: ORT 0.27 -> 0.46 ms/token), so
    # interleaving the two would charge torch's overhead to ONNX Runtime
    torch_prepare = _torch_step(model_dir)
    torch_ms: dict[str, dict[str, float]] | None = None
    if torch_prepare is not None:
        torch_ms = {str(ctx): _time(torch_prepare(ctx), repeats) for ctx in contexts}
    res: dict[str, Any] = {
        "cpu": cpu_model(),
        "device": device,
        "onnxruntime": ort.__version__,
        "decoder": choice.to_dict(),
        "ort_int8_token_ms": ort_ms,
        "auto_token_ms": auto_ms,
        "prefill_ms": prefill_ms,
        "torch_token_ms": torch_ms,
        "bar_ms": _pct(bar_ms),
        "note_events_per_s": note_events_per_s,
        "token_ms_at_d1": d1_ms,
        "note_events_per_s_at_d1": note_events_per_s_at_d1,
        "decoders_at_d1": len(knob),
        "readout_ms": _pct(readout_ms),
        "readout_notes": len(four.notes),
        "concept": concept_res,
    }
    key = str(floor_ctx)
    res["floor"] = {
        "context": floor_ctx,
        "macs": macs,
        "ms": floor,
        "gmacs_per_s": round(macs / floor["p50"] / 1e6, 2),
        "bytes": moved,
        "gb_per_s": round(moved / floor["p50"] / 1e6, 2),
        "how": "ORT fp32 MatMul chain of the step's shapes, one thread",
    }
    # the served step's own bytes at the rate the chain moved its (4 bytes a multiply-
    # add): the time a step cannot beat on this host while its weights and cache do not
    # stay in the core's own cache between tokens
    res["bytes_floor"] = {
        "context": floor_ctx,
        "bytes": served_bytes,
        "ms": round(served_bytes / moved * floor["p50"], 4),
        "how": "the served decoder's weights as stored and its K/V cache, at the chain's rate",
    }
    if device == "cpu":
        # the served step against the CPU's own multiply-add rate: a CPU figure
        res["floor_ratio"] = round(auto_ms[key]["p50"] / floor["p50"], 2)
        res["bytes_floor_ratio"] = round(auto_ms[key]["p50"] / res["bytes_floor"]["ms"], 2)
    if torch_ms:
        # the served (auto) step against torch eager
        res["speedup_vs_torch_256"] = round(torch_ms[key]["p50"] / auto_ms[key]["p50"], 2)
    res["notes_per_bar"] = round(bar_notes / bars, 2)
    res["note_events_counted_as"] = "notes (one note = its on/off pair)"
    return res
