"""BAD fine-tuning: its loss falls with a step, the knob mixes the learned divergence."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from divergent.model.bad_config import BAD_LATENTS, METHODS, BadConfig
from divergent.model.files import (
    CONFIG_FILE,
    CRITIC_PT_FILE,
    DEVICE_CHOICES,
    WEIGHTS_FILE,
    diverged_file,
)
from tests.conftest import step_by_hand


@pytest.fixture(scope="module")
def bad_setup(tiny_run: Path, two_class_dataset: Path, two_class_critic):  # type: ignore[no-untyped-def]
    import torch

    from divergent.model.bad import _prompts, _Real, banned_tokens, sample
    from divergent.model.critic import PhraseBank, class_of_works, load_critic
    from divergent.model.train import load_model

    torch.manual_seed(0)
    model, _ = load_model(tiny_run / WEIGHTS_FILE)
    critic, cblob = load_critic(two_class_critic[0] / CRITIC_PT_FILE)
    _, labels = class_of_works(two_class_dataset, int(cblob["config"]["min_works"]))
    bank = PhraseBank(two_class_dataset, "train", labels["train"], 32)
    real = _Real(critic, bank, 8)
    prompt, _ = _prompts(bank, 8, 32, np.random.default_rng(0))
    with torch.no_grad():
        z = model.encode(prompt, torch.ones(prompt.shape))[0]
    gen_ids = sample(
        model, prompt, z, 32, banned_tokens(bank.vocab), torch.Generator().manual_seed(0)
    )
    return model, critic, real, prompt, z, gen_ids


def _tiny_bad(run: Path, data: Path, critic, tmp: Path, **kw) -> BadConfig:  # type: ignore[no-untyped-def]
    """A BAD run small enough for a test: the tiny model, the two-class critic."""
    kw.setdefault("latents", "posterior")  # "mixed" pushes with a model folder's latents
    return BadConfig(
        data=str(data),
        base=str(run / WEIGHTS_FILE),
        critic=str(critic[0] / CRITIC_PT_FILE),
        out=str(tmp / "bad"),
        batch_size=4,
        prompt_tokens=32,
        gen_tokens=32,
        real_per_class=6,
        checkpoint_every=1,
        threads=1,
        **kw,
    )


def _one_step_lowers(loss, opt) -> None:  # type: ignore[no-untyped-def]
    """One optimiser step on ``loss()`` lowers it (the loss is a function of the weights)."""
    import torch

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert float(after) < float(before.detach())


@pytest.mark.parametrize("method", ["expected", "policy_gradient"])
def test_one_bad_step_lowers_its_loss_on_a_tiny_model(bad_setup, method: str) -> None:  # type: ignore[no-untyped-def]
    import copy

    import torch

    from divergent.model.bad import _loss, _trainable

    model0, critic, real, prompt, z, gen_ids = bad_setup
    model = copy.deepcopy(model0)
    base = copy.deepcopy(model0).eval()
    cfg = BadConfig(method=method, bf16=False, lr=1e-4, gen_tokens=32, prompt_tokens=32)
    params = _trainable(model)
    opt = torch.optim.SGD(params, lr=cfg.lr)

    def loss() -> torch.Tensor:
        # the same real draw each time: the loss is a deterministic function of the weights
        return _loss(cfg, model, base, critic, real, prompt, z, gen_ids, np.random.default_rng(3))[
            0
        ]

    _one_step_lowers(loss, opt)
    # the phrase encoder is not trained
    for (n, p), p0 in zip(model.named_parameters(), model0.parameters(), strict=True):
        if n.startswith("encoder."):
            assert torch.equal(p, p0)


def test_straight_through_reads_the_samples_and_trains_through_the_softmax(bad_setup) -> None:  # type: ignore[no-untyped-def]
    import copy

    import torch

    from divergent.model.bad import _loss, _trainable, mmd2

    model0, critic, real, prompt, z, gen_ids = bad_setup
    model = copy.deepcopy(model0)
    base = copy.deepcopy(model0).eval()
    params = _trainable(model)

    def run(method: str, kl: float) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = BadConfig(method=method, bf16=False, kl_weight=kl, gen_tokens=32, prompt_tokens=32)
        return _loss(cfg, model, base, critic, real, prompt, z, gen_ids, np.random.default_rng(3))

    # with no KL term, its value is the set loss of the sampled tokens' own features
    loss, _ = run("straight_through", 0.0)
    cls, whole = real.draw(np.random.default_rng(3))
    c = BadConfig()
    with torch.no_grad():
        g = real.std_(critic(gen_ids))
        hard_value = c.class_weight * sum(float(mmd2(g, r, c.sigma)) for r in cls)
        hard_value += c.global_weight * float(mmd2(g, whole, c.sigma))
    assert float(loss.detach()) == pytest.approx(hard_value, rel=1e-4, abs=1e-4)
    # the softmax rows' features give another value; this one still has their gradient
    soft_loss, _ = run("expected", 0.0)
    assert float(soft_loss.detach()) != pytest.approx(hard_value, rel=1e-3)
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_the_base_answers_term_adds_its_weighted_mmd_and_pushes_away(bad_setup) -> None:  # type: ignore[no-untyped-def]
    """``base_weight`` adds w · MMD²(φ(G), φ(base answers)) to the loss; with w < 0 a step
    moves the answers' features away from the base model's own answers."""
    import copy

    import torch

    from divergent.model.bad import _loss, _trainable, mmd2, sample

    model0, critic, real, prompt, z, gen_ids = bad_setup
    model = copy.deepcopy(model0)
    base = copy.deepcopy(model0).eval()
    nothing_banned = torch.zeros(0, dtype=torch.int64)
    with torch.no_grad():
        base_ids = sample(base, prompt, z, 32, nothing_banned, torch.Generator().manual_seed(7))
        base_feats = real.std_(critic(base_ids))

    def run(w: float, **kw: object) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = BadConfig(
            bf16=False, kl_weight=0.0, base_weight=w, gen_tokens=32, prompt_tokens=32, **kw
        )  # type: ignore[arg-type]
        feats = base_feats if w else None
        rng = np.random.default_rng(3)  # the same real draw: a function of the weights
        return _loss(cfg, model, base, critic, real, prompt, z, gen_ids, rng, base_feats=feats)

    plain, _ = run(0.0, method="straight_through")
    pushed, stats = run(-2.0, method="straight_through")
    with torch.no_grad():
        term = float(mmd2(real.std_(critic(gen_ids)), base_feats, 1.0))
    assert stats["mmd_base"] == pytest.approx(term, rel=1e-5)
    assert float(pushed.detach()) == pytest.approx(float(plain.detach()) - 2.0 * term, rel=1e-4)
    # a step on the base term alone moves the softmax rows' features away from the base's
    params = _trainable(model)
    opt = torch.optim.SGD(params, lr=1e-3)

    def loss() -> torch.Tensor:
        return run(-1.0, method="expected", class_weight=0.0, global_weight=0.0)[0]

    _one_step_lowers(loss, opt)  # i.e. MMD² to the base answers rose


def test_bad_train_checkpoints_resumes_and_exports(  # type: ignore[no-untyped-def]
    tiny_run: Path, tiny_model, two_class_dataset: Path, two_class_critic, tmp_path: Path
) -> None:
    from divergent.export.onnx_export import export_diverged
    from divergent.model.bad import train_bad
    from divergent.model.runtime import OnnxModel

    cfg = _tiny_bad(tiny_run, two_class_dataset, two_class_critic, tmp_path, steps=2)
    res = train_bad(cfg, progress=False)
    assert res["steps"] == 2
    lines = (tmp_path / "bad" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    more = train_bad(
        BadConfig.from_dict({**cfg.to_dict(), "steps": 3, "resume": True}), progress=False
    )
    assert more["steps"] == 3
    assert len((tmp_path / "bad" / "log.jsonl").read_text().splitlines()) == 3

    folder = tmp_path / "model"
    shutil.copytree(tiny_model[0], folder)
    before = set(folder.iterdir())
    info = export_diverged(tmp_path / "bad" / WEIGHTS_FILE, folder)
    assert info["step"] == 3
    m = OnnxModel(folder)
    assert m.diverged is not None
    # the int8 decoder and its prefill-only twin, and nothing else left behind
    added = {f.name for f in set(folder.iterdir()) - before}
    assert added == {diverged_file("int8"), diverged_file("int8dyn")}
    ops = {name: {n.op_type for n in onnx.load(str(folder / name)).graph.node} for name in added}
    assert "MatMulNBits" in ops[diverged_file("int8")]
    twin = ops[diverged_file("int8dyn")]  # the dynamic kind, as the base model's twin
    assert "MatMulInteger" in twin and "MatMulNBits" not in twin
    # another model's fine-tune is refused
    other = tmp_path / "other"
    shutil.copytree(tiny_model[0], other)
    cfgj = json.loads((other / CONFIG_FILE).read_text())
    cfgj["model"]["n_layer"] += 1
    (other / CONFIG_FILE).write_text(json.dumps(cfgj))
    with pytest.raises(ValueError):
        export_diverged(tmp_path / "bad" / WEIGHTS_FILE, other)


def test_config_round_trip_and_methods() -> None:
    c = BadConfig(method="gumbel_st", steps=3)
    assert BadConfig.from_dict(c.to_dict()) == c
    assert set(METHODS) == {"expected", "gumbel_st", "straight_through", "policy_gradient"}
    with pytest.raises(ValueError):
        BadConfig(method="nope")
    with pytest.raises(ValueError):
        BadConfig.from_dict({"warp": 1})
    for field, good in (("device", DEVICE_CHOICES), ("latents", BAD_LATENTS)):
        for value in good:
            assert BadConfig.from_dict({field: value}).to_dict()[field] == value
        with pytest.raises(ValueError, match=field):
            BadConfig.from_dict({field: "tpu"})


def test_mixed_latents_keep_a_third_posterior_and_push_or_sample_the_rest(  # type: ignore[no-untyped-def]
    tiny_model,
) -> None:
    import torch

    from divergent.model.bad import _latents
    from divergent.model.divergence import Steering

    z_dim = json.loads((tiny_model[0] / CONFIG_FILE).read_text())["model"]["z_dim"]
    mu = torch.randn(300, z_dim)
    steering = Steering.from_model_dir(tiny_model[0])
    mixed = BadConfig(latents="mixed")
    z, start = _latents(mixed, mu, steering, np.random.default_rng(0))
    assert z.shape == mu.shape and z.dtype == torch.float32
    same = (z == mu).all(1).float().mean().item()
    assert 0.2 < same < 0.47  # a third kept, the rest moved (pushed or drawn from the prior)
    # where each answer starts before any push (the knob's d = 0 answer's latent): the
    # prompt's own for the kept and the pushed rows, the prior draw for the drawn ones
    kinds = np.random.default_rng(0).integers(0, 3, len(mu))
    assert torch.equal(start[kinds != 2], mu[kinds != 2])
    assert torch.equal(start[kinds == 2], z[kinds == 2])
    # posterior: the latents are the prompts' own, untouched
    posterior = BadConfig(latents="posterior")
    assert all(x is mu for x in _latents(posterior, mu, steering, np.random.default_rng(0)))


def test_knob_latents_push_the_prior_draws_as_well(  # type: ignore[no-untyped-def]
    tiny_model,
) -> None:
    """The "knob" mix moves the same rows as "mixed" (the kinds come first from the rng), and
    pushes its prior samples away from the latent bank, as the knob pushes any latent."""
    import torch

    from divergent.model.bad import _latents
    from divergent.model.divergence import Steering

    z_dim = json.loads((tiny_model[0] / CONFIG_FILE).read_text())["model"]["z_dim"]
    mu = torch.randn(300, z_dim)
    steering = Steering.from_model_dir(tiny_model[0])
    kinds = np.random.default_rng(0).integers(0, 3, len(mu))
    mixed, _ = _latents(BadConfig(latents="mixed"), mu, steering, np.random.default_rng(0))
    knob, start = _latents(BadConfig(latents="knob"), mu, steering, np.random.default_rng(0))
    # a pushed prior draw starts from the draw itself (the d = 0 answer's latent)
    assert torch.equal(start[kinds != 2], mu[kinds != 2])
    assert not (start[kinds == 2] == knob[kinds == 2]).all(1).any()
    assert torch.equal(knob[kinds == 0], mu[kinds == 0])
    assert not (knob[kinds != 0] == mu[kinds != 0]).all(1).any()
    # pushed by d ~ U(0, 1) × latent_scale × √Z: further out than the plain prior draws
    pushed, drawn = knob[kinds == 2].norm(dim=1).mean(), mixed[kinds == 2].norm(dim=1).mean()
    assert float(pushed) > float(drawn) + 0.5


@pytest.mark.parametrize(("latents", "base_weight"), [("mixed", 0.0), ("knob", -2.0)])
def test_bad_train_with_the_knobs_latents_runs_and_logs(  # type: ignore[no-untyped-def]
    tiny_run: Path,
    tiny_model,
    two_class_dataset: Path,
    two_class_critic,
    tmp_path: Path,
    latents: str,
    base_weight: float,
) -> None:
    from divergent.model.bad import train_bad

    cfg = _tiny_bad(
        tiny_run,
        two_class_dataset,
        two_class_critic,
        tmp_path,
        steps=2,
        latents=latents,
        base_weight=base_weight,
        knob_model=str(tiny_model[0]),
    )
    res = train_bad(cfg, progress=False)
    assert res["steps"] == 2 and res["device"] == "cpu"
    assert res["config"]["latents"] == latents
    assert res["config"]["base_weight"] == base_weight
    logged = [json.loads(x) for x in (tmp_path / "bad" / "log.jsonl").read_text().splitlines()]
    # the distance to the base model's own answers is logged only when it is in the loss
    assert [("mmd_base" in row) for row in logged] == [bool(base_weight)] * 2


@pytest.fixture(scope="module")
def diverged_model(  # type: ignore[no-untyped-def]
    tiny_run: Path, tiny_model, two_class_dataset: Path, two_class_critic, tmp_path_factory
) -> Path:
    """The tiny model with a (briefly, strongly) BAD-tuned decoder added."""
    from divergent.export.onnx_export import export_diverged
    from divergent.model.bad import train_bad

    tmp = tmp_path_factory.mktemp("diverged")
    cfg = _tiny_bad(tiny_run, two_class_dataset, two_class_critic, tmp, steps=3, lr=3e-3)
    train_bad(cfg, progress=False)
    folder = tmp / "model"
    shutil.copytree(tiny_model[0], folder)
    export_diverged(tmp / "bad" / WEIGHTS_FILE, folder)
    return folder


def _prompt(model) -> np.ndarray:  # type: ignore[no-untyped-def]
    from divergent.model.generate import ids_from_notes

    notes = [(i * 0.5, 60 + (i * 5) % 12, 0.5, 90) for i in range(16)]
    return ids_from_notes(model, notes)


def test_knob_at_zero_is_plain_sampling(diverged_model: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    from divergent.model.generate import Generator
    from divergent.model.runtime import OnnxModel

    with_bad = OnnxModel(diverged_model)
    without = OnnxModel(tiny_model[0])
    assert with_bad.diverged is not None and without.diverged is None
    prompt = _prompt(without)
    for seed in range(3):
        a = Generator(with_bad).continue_ids(prompt, bars=2, seed=seed, divergence=0.0)
        b = Generator(without).continue_ids(prompt, bars=2, seed=seed, divergence=0.0)
        assert a.tokens == b.tokens
        assert a.logprobs == b.logprobs


def test_the_diverged_decoder_prefills_on_its_twin_where_the_model_prefills_int8dyn(
    diverged_model: Path, tmp_path: Path
) -> None:
    from divergent.model.generate import Generator
    from divergent.model.runtime import IncrementalDecoder, OnnxModel

    m = OnnxModel(diverged_model, prefill="int8dyn")
    assert m.diverged is not None and m.diverged_prefill is not m.diverged
    div = Generator(m).div_decoder
    assert div is not None and div.prefill_session is m.diverged_prefill
    assert div.session is m.diverged
    # the prefill is the twin's, to the bit; the next step, the int8 decoder's on the
    # cache the twin wrote (the same call made by hand gives the same logits)
    ids = _prompt(m)
    twin = IncrementalDecoder(m, session=m.diverged_prefill)
    np.testing.assert_array_equal(div.feed(ids, all_logits=True), twin.feed(ids, all_logits=True))
    np.testing.assert_array_equal(div.feed([7]), step_by_hand(m.diverged, m, twin, token=7))
    # prefilling on a file the diverged decoder has no twin for: on itself
    for prefill in ("int8", "fp32"):
        other = OnnxModel(diverged_model, prefill=prefill)
        assert other.diverged_prefill is other.diverged
    # an older folder without the twin: on itself too; a concept's copy has neither
    older = tmp_path / "older"
    shutil.copytree(diverged_model, older)
    (older / diverged_file("int8dyn")).unlink()
    old = OnnxModel(older, prefill="int8dyn")
    assert old.diverged is not None and old.diverged_prefill is old.diverged
    copy = m.with_decoder_initializers({})
    assert copy.diverged is None and copy.diverged_prefill is None


def _with_a_float16_cache(src: Path, dst: Path, past: list[str], present: list[str]) -> None:
    """``src`` rewritten to take and give its KV cache in float16 (Casts at its edges):
    a decoder that loads and runs, but cannot continue a float32 cache."""
    g = (m := onnx.load(str(src))).graph
    for names, edge in ((past, g.input), (present, g.output)):
        for name in names:
            inner = f"{name}.f32"
            for node in g.node:
                for slots in (node.input, node.output):
                    for i, x in enumerate(slots):
                        if x == name:
                            slots[i] = inner
            next(
                v for v in edge if v.name == name
            ).type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
            if names is past:
                cast = onnx.helper.make_node("Cast", [name], [inner], to=onnx.TensorProto.FLOAT)
                g.node.insert(0, cast)
            else:
                g.node.append(
                    onnx.helper.make_node("Cast", [inner], [name], to=onnx.TensorProto.FLOAT16)
                )
    onnx.save(m, str(dst))


@pytest.mark.parametrize("which", ["int8", "int8dyn"])
def test_a_diverged_file_with_another_cache_type_is_refused_at_load_by_name(
    diverged_model: Path, tmp_path: Path, which: str
) -> None:
    import onnxruntime as ort

    from divergent.model.runtime import ModelError, OnnxModel

    m = OnnxModel(diverged_model, prefill="int8dyn")
    folder = tmp_path / "model"
    shutil.copytree(diverged_model, folder)
    bad = folder / diverged_file(which)
    _with_a_float16_cache(diverged_model / diverged_file(which), bad, m.past_names, m.present_names)
    session = ort.InferenceSession(str(bad), providers=["CPUExecutionProvider"])
    assert {i.type for i in session.get_inputs() if i.name in m.past_names} == {"tensor(float16)"}
    with pytest.raises(ModelError, match=rf"{diverged_file(which)} keeps its KV cache in float16"):
        OnnxModel(folder, prefill="int8dyn")
    if which == "int8dyn":  # a host that prefills int8 never opens the twin
        assert OnnxModel(folder, prefill="int8").diverged_prefill is not None


def test_knob_departs_monotonically_from_the_base_model(diverged_model: Path) -> None:
    """KL(knob(d) || base) of the next-token distribution rises with d, and at d > 0 the
    answers come from the learned divergence (they differ from the base decoder's)."""
    from divergent.model.divergence import mix_logits
    from divergent.model.generate import Generator
    from divergent.model.runtime import IncrementalDecoder, OnnxModel

    m = OnnxModel(diverged_model)
    prompt = _prompt(m)
    gen = Generator(m)
    base = IncrementalDecoder(m)
    div = IncrementalDecoder(m, session=m.diverged)
    ctx = gen._context(prompt)
    mu = gen.latent(prompt)
    for dec in (base, div):
        dec.set_z(mu)
        dec.feed(ctx)
    b, d1 = base.last_logits.astype(np.float64), div.last_logits.astype(np.float64)
    assert not np.allclose(b, d1)

    def logp(x: np.ndarray) -> np.ndarray:
        return x - np.logaddexp.reduce(x)

    kls = []
    for level in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        w = gen.steering.mix_weight(level)
        p = logp(mix_logits(b, d1, w))
        kls.append(float((np.exp(p) * (p - logp(b))).sum()))
    assert kls[0] == 0.0
    assert all(x < y for x, y in itertools.pairwise(kls)), kls
    assert np.array_equal(mix_logits(b, d1, 0.0), b)


def test_matched_temperature_search_on_a_toy_curve() -> None:
    from divergent.model.divergence_eval import matched_temperature

    temps = [1.0, 1.5, 2.0, 3.0]
    novelty = [0.1, 0.3, 0.5, 0.9]
    assert matched_temperature(0.1, temps, novelty) == 1.0
    assert matched_temperature(0.4, temps, novelty) == pytest.approx(1.75)
    assert matched_temperature(0.7, temps, novelty) == pytest.approx(2.5)
    assert matched_temperature(0.95, temps, novelty) is None
    assert matched_temperature(0.05, temps, novelty) is None
    # a noisy, non-monotone sweep: the first crossing along the sweep
    assert matched_temperature(0.3, [1.0, 2.0, 3.0], [0.2, 0.4, 0.35]) == pytest.approx(1.5)


def test_knob_answers_are_deterministic_per_seed_with_the_diverged_decoder(
    diverged_model: Path,
) -> None:
    """At d > 0 the diverged decoder runs on a worker thread: same seed, same answer."""
    from divergent.model.generate import Generator
    from divergent.model.runtime import OnnxModel

    m = OnnxModel(diverged_model)
    prompt = _prompt(m)
    a = Generator(m).continue_ids(prompt, bars=2, seed=5, divergence=0.7)
    b = Generator(m).continue_ids(prompt, bars=2, seed=5, divergence=0.7)
    assert a.tokens == b.tokens and a.base_logprobs == b.base_logprobs
    assert a.tokens != Generator(m).continue_ids(prompt, bars=2, seed=5, divergence=0.0).tokens


@pytest.mark.parametrize("chunk", [5, 32])
@pytest.mark.parametrize("room", [400, 9])  # within the cache / across its end
def test_base_reader_reads_what_the_live_path_reads(
    diverged_model: Path, room: int, chunk: int
) -> None:
    """At w = 1 the readout's base log-probabilities come from chunks read on the side
    thread (and, at the cache's end, a rewind as the live path makes): the same figures."""
    from concurrent.futures import ThreadPoolExecutor

    from divergent.model.generate import _BaseReader
    from divergent.model.grammar import logsoftmax
    from divergent.model.runtime import IncrementalDecoder, OnnxModel

    m = OnnxModel(diverged_model)
    rng = np.random.default_rng(room + chunk)
    context = rng.integers(1, m.vocab_size, max(8, m.block_size - room)).tolist()
    answer = rng.integers(1, m.vocab_size, 21).tolist()
    masks = [np.where(rng.random(m.vocab_size) < 0.3, -np.inf, 0.0) for _ in answer]
    for mask, tok in zip(masks, answer, strict=True):
        mask[tok] = 0.0
    live = IncrementalDecoder(m)
    live.feed(context)
    want = []
    for mask, tok in zip(masks, answer, strict=True):
        want.append(float(logsoftmax(live.last_logits, mask)[tok]))
        live.feed([tok])
    dec = IncrementalDecoder(m)
    dec.feed(context)
    with ThreadPoolExecutor(max_workers=1) as pool:
        reader = _BaseReader(dec, pool)
        reader.CHUNK = chunk
        out: list[int] = []
        for mask, tok in zip(masks, answer, strict=True):
            reader.masks.append(mask)
            out.append(tok)
            reader.step(out)
        reader.masks.append(masks[0])  # a closing Bar: sampled, its mask kept, not kept
        got = reader.logprobs(out)
    assert got == pytest.approx(want, abs=1e-4)


def test_an_answer_failing_midway_at_the_knobs_top_leaves_the_next_one_whole(
    diverged_model: Path,
) -> None:
    """A failure mid-answer (here the note callback) may leave a chunk being read on the
    side thread: the next answer waits for it, and is the answer a fresh generator makes."""
    from divergent.model.generate import Generator
    from divergent.model.runtime import OnnxModel

    m = OnnxModel(diverged_model)
    prompt = _prompt(m)
    gen = Generator(m)
    gen_notes: list[object] = []

    def boom(notes: list[object]) -> None:
        gen_notes.extend(notes)
        if len(gen_notes) >= 12:
            raise RuntimeError("the sink broke")

    with pytest.raises(RuntimeError, match="sink broke"):
        gen.continue_ids(prompt, bars=8, seed=2, divergence=1.0, on_notes=boom)
    again = gen.continue_ids(prompt, bars=2, seed=3, divergence=1.0)
    fresh = Generator(m).continue_ids(prompt, bars=2, seed=3, divergence=1.0)
    assert again.tokens == fresh.tokens
    assert again.base_logprobs == pytest.approx(fresh.base_logprobs, abs=1e-5)


def test_knob_at_one_runs_only_the_readout_row_and_answers_the_same(
    diverged_model: Path,
) -> None:
    """At w(d) = 1 the answer's logits are the diverged decoder's alone, so the base
    decoder runs only the readout's row: same answer and readout as the two-row path
    (w a hair below 1), for less work a token."""
    import dataclasses

    from divergent.model.generate import Generator
    from divergent.model.runtime import OnnxModel

    m = OnnxModel(diverged_model)
    prompt = _prompt(m)
    one = Generator(m)
    assert one.steering.mix_weight(1.0) == 1.0
    near = Generator(m)
    near.steering.config = dataclasses.replace(near.steering.config, bad_weight=1.0 - 1e-7)
    for seed in range(3):
        a = one.continue_ids(prompt, bars=2, seed=seed, divergence=1.0)
        b = near.continue_ids(prompt, bars=2, seed=seed, divergence=1.0)
        assert a.tokens == b.tokens
        assert a.base_logprobs == pytest.approx(b.base_logprobs, abs=1e-4)
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
