"""The ``divergent`` command line.

Each subcommand imports what it needs when it runs, so ``divergent generate`` and the
serving path never load torch, and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("divergent")


class CLIError(Exception):
    """An error the user can fix: printed as one line, exit status 2."""


def _cmd_data_build(args: argparse.Namespace) -> int:
    from divergent.model.data import build_dataset

    summary = build_dataset(
        args.out,
        corpus=not args.no_corpus,
        midi_dirs=args.midi or [],
        limit_per_source=args.limit_per_source,
        sources=args.sources.split(",") if args.sources else None,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(json.dumps(summary.__dict__, indent=1))
    return 0


def _cmd_data_index(args: argparse.Namespace) -> int:
    from divergent.model.data import build_readout_banks

    print(json.dumps(build_readout_banks(args.out), indent=1))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from divergent.model.train import TrainConfig, train

    cfg = TrainConfig.from_args(args)
    train(cfg)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from divergent.export.onnx_export import export_checkpoint

    report = export_checkpoint(
        Path(args.checkpoint), Path(args.out), data=args.data, parity_windows=args.parity_windows
    )
    print(json.dumps(report, indent=1))
    return 0


def _cmd_critic_train(args: argparse.Namespace) -> int:
    from divergent.model.critic import CriticConfig, train_critic

    _ensure_dataset(args.data)
    cfg = CriticConfig(
        data=args.data, out=args.out, steps=args.steps, threads=args.threads, seed=args.seed
    )
    card = train_critic(cfg, progress=not args.quiet)
    print(json.dumps(card, indent=None if args.json else 1))
    return 0


def _cmd_bad_train(args: argparse.Namespace) -> int:
    from divergent.model.bad import BadConfig, train_bad

    _ensure_dataset(args.data)
    try:
        cfg = BadConfig(
            data=args.data,
            base=args.base,
            critic=args.critic,
            out=args.out,
            method=args.method,
            steps=args.steps,
            max_minutes=args.max_minutes,
            batch_size=args.batch_size,
            lr=args.lr,
            class_weight=args.class_weight,
            global_weight=args.global_weight,
            kl_weight=args.kl_weight,
            base_weight=args.base_weight,
            sigma=args.sigma,
            threads=args.threads,
            device=args.device,
            latents=args.latents,
            seed=args.seed,
            resume=args.resume,
        )
    except ValueError as e:
        raise CLIError(str(e)) from e
    for path in (cfg.base, cfg.critic):
        if not Path(path).exists():
            raise CLIError(f"not found: {path}")
    result = train_bad(cfg, progress=not args.quiet)
    print(json.dumps(result, indent=None if args.json else 1))
    return 0


def _cmd_bad_export(args: argparse.Namespace) -> int:
    from divergent.export.onnx_export import export_diverged

    if not Path(args.checkpoint).exists():
        raise CLIError(f"not found: {args.checkpoint}")
    try:
        print(json.dumps(export_diverged(Path(args.checkpoint), Path(args.out)), indent=1))
    except ValueError as e:
        raise CLIError(str(e)) from e
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from divergent.model.concept import ConceptError
    from divergent.model.generate import GenerateError, generate_file
    from divergent.model.runtime import ModelError

    try:
        result = generate_file(
            Path(args.prompt),
            Path(args.output),
            bars=args.bars,
            seed=args.seed,
            temperature=args.temperature,
            top_p=args.top_p,
            divergence=args.divergence,
            model_dir=Path(args.model) if args.model else None,
            concept=args.concept,
            concepts_dir=_concepts_dir(args),
            device=args.device,
            concept_strength=args.concept_strength,
        )
    except (GenerateError, ModelError, ConceptError) as e:
        raise CLIError(str(e)) from e
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(
            f"wrote {args.output}: {result['notes']} notes in {result['bars']} bars "
            f"({result['compute_ms']:.0f} ms)"
        )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from divergent.server.config import ConfigError, config_from_args

    try:
        config = config_from_args(args)
    except ConfigError as e:
        raise CLIError(str(e)) from e
    if args.print_config:
        print(config.to_toml(), end="")
        return 0
    if not args.verbose:
        # --log-level (or the config file's log_level) sets how much the server says
        logging.getLogger("divergent").setLevel(config.log_level.upper())
    from divergent.bridges.exceptions import BridgeError
    from divergent.model.concept import ConceptError
    from divergent.model.runtime import ModelError, check_device
    from divergent.server.app import Server
    from divergent.server.heap import fix_mmap_threshold, limit_malloc_arenas

    try:
        check_device(config.device)  # refused before the server starts: nothing opened
        limit_malloc_arenas()  # before the server's threads (server/heap.py says why)
        fix_mmap_threshold()  # before the model's first prefill (the same says why)
        asyncio.run(Server(config).serve())
    except (BridgeError, ModelError, ConceptError, OSError) as e:
        raise CLIError(str(e)) from e
    return 0


def _cmd_ports(args: argparse.Namespace) -> int:
    from divergent.bridges.exceptions import BridgeError
    from divergent.bridges.midi import choose_backend, list_ports

    try:
        backend = choose_backend(args.midi_backend)
        ports = list_ports(backend)
    except BridgeError as e:
        raise CLIError(str(e)) from e
    if args.json:
        print(json.dumps({"backend": backend, **ports}, indent=1))
        return 0
    print(f"MIDI backend: {backend}")
    for kind in ("inputs", "outputs"):
        print(f"{kind}:")
        for name in ports[kind] or ["(none)"]:
            print(f"  {name}")
    return 0


def _cmd_sessions(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from divergent.server.recorder import default_sessions_dir, list_takes

    folder = Path(args.sessions) if args.sessions else default_sessions_dir()
    takes = list_takes(folder)
    if args.json:
        print(json.dumps([asdict(t) | {"path": str(t.path)} for t in takes], indent=1))
        return 0
    if not takes:
        print(f"no takes in {folder}")
        return 0
    print(f"takes in {folder}:")
    for t in takes:
        print(
            f"  {t.path.name}  {t.duration_s:7.1f} s  performer {t.performer_notes:4d} notes"
            f"  machine {t.machine_notes:4d} notes  {t.answers:3d} answers"
            f"{'  (recovered)' if t.recovered else ''}"
            f"{f'  UNREADABLE: {t.error}' if t.error else ''}"
        )
    return 0


def _cmd_bench_live(args: argparse.Namespace) -> int:
    from divergent.server.bench_live import mqtt_outage, run_bench_live

    if args.mqtt_outage:
        res = mqtt_outage(outage_s=args.mqtt_outage, jack_period=args.jack_period)
    elif args.learning:
        from divergent.server.bench_live import run_bench_learning

        res = run_bench_learning(answers=args.answers, jack_period=args.jack_period)
    elif args.web_clients:
        from divergent.server.bench_live import run_bench_web

        res = run_bench_web(
            web_clients=args.web_clients, answers=args.answers, jack_period=args.jack_period
        )
    else:
        res = run_bench_live(
            answers=args.answers, flood_s=args.flood_seconds, jack_period=args.jack_period
        )
    from divergent.model.host import cpu_model

    res = {"cpu": cpu_model(), **res}  # absolute figures are this CPU's
    print(json.dumps(res, indent=None if args.json else 1))
    return 0


def _cmd_bench_soak(args: argparse.Namespace) -> int:
    from divergent.server.bench_soak import run_bench_soak

    if args.minutes <= 0 or args.window_seconds <= 0:
        raise CLIError("--minutes and --window-seconds must be more than 0")
    if args.warm_prefills is not None and args.warm_prefills < 0:
        raise CLIError("--warm-prefills must be 0 or more")
    res = run_bench_soak(
        minutes=args.minutes,
        window_s=args.window_seconds,
        jack_period=args.jack_period,
        concepts=Path(args.concepts) if args.concepts else None,
        warm_prefills=args.warm_prefills,
    )
    print(json.dumps(res, indent=None if args.json else 1))
    return 0


def _cmd_evaluate_nll(args: argparse.Namespace) -> int:
    from divergent.model.evaluate import evaluate_nll

    _ensure_dataset(args.data)
    res = evaluate_nll(
        data=Path(args.data),
        model_dir=Path(args.model) if args.model else None,
        max_tokens=args.max_tokens,
        order=args.order,
    )
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


def _ensure_dataset(data: str) -> None:
    """Build the dataset first when it is missing, so one command reproduces a report."""
    if not (Path(data) / "manifest.json").exists():
        from divergent.model.data import build_dataset

        log.info("no dataset at %s: building it from music21's corpus first (~11 min)", data)
        build_dataset(data)


def _cmd_evaluate_divergence(args: argparse.Namespace) -> int:
    from divergent.model.divergence_eval import EvalProtocol, evaluate_divergence

    _ensure_dataset(args.data)
    sets = args.paper_seed_sets
    res = evaluate_divergence(
        data=Path(args.data),
        model_dir=Path(args.model) if args.model else None,
        report=Path(args.report) if args.report else None,
        protocol=EvalProtocol(
            prompts=args.prompts,
            samples=args.samples,
            seed=args.seed,
            **({} if sets is None else {"paper_seed_sets": sets}),
        ),
    )
    print(json.dumps(res, indent=None if args.json else 1))
    return 0


def _cmd_evaluate_latent(args: argparse.Namespace) -> int:
    from divergent.model.evaluate import evaluate_latent

    _ensure_dataset(args.data)
    res = evaluate_latent(data=Path(args.data), model_dir=Path(args.model) if args.model else None)
    print(json.dumps(res, indent=None if args.json else 1))
    return 0


def _cmd_bench_model(args: argparse.Namespace) -> int:
    from divergent.model.bench import bench_model
    from divergent.model.concept import ConceptError
    from divergent.model.runtime import ModelError

    try:
        res = bench_model(
            model_dir=Path(args.model) if args.model else None,
            repeats=args.repeats,
            device=args.device,
            concept=args.concept,
            concepts_dir=_concepts_dir(args),
        )
    # a device that cannot run the model, a concept that cannot load: one line, status 2
    except (ModelError, ConceptError) as e:
        raise CLIError(str(e)) from e
    print(json.dumps(res, indent=None if args.json else 1))
    return 0


def _concepts_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.concepts) if args.concepts else None


def _add_concept_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """``--concept NAME[+NAME]`` and ``--concepts DIR``, as ``generate`` and ``bench
    model`` take them."""
    p.add_argument("--concept", default=None, metavar="NAME[+NAME]", help=what)
    p.add_argument("--concepts", default=None, metavar="DIR", help="concepts folder")


def _cmd_concept_learn(args: argparse.Namespace) -> int:
    from divergent.model.concept import (
        ConceptError,
        LearnConfig,
        TrainingExtraMissing,
        learn_concept,
    )
    from divergent.model.runtime import ModelError

    if args.nice > 0 and hasattr(os, "nice"):
        # the live server learns while the music plays: the learner yields the CPU to it
        os.nice(args.nice)
    try:
        cfg = LearnConfig(
            fraction=args.fraction,
            mask=args.mask,
            steps=args.steps,
            prompted=args.prompted,
            seed=args.seed,
            threads=args.threads,
        )
        _, path, summary = learn_concept(
            args.name,
            [Path(r) for r in args.refs],
            config=cfg,
            concepts_dir=_concepts_dir(args),
            model_dir=Path(args.model) if args.model else None,
            progress=not args.json,
        )
    except TrainingExtraMissing as e:
        # its own exit status: a caller running this as a process can say what to install
        print(f"divergent: error: {e}", file=sys.stderr)
        return TrainingExtraMissing.exit_code
    except (ConceptError, ModelError) as e:
        raise CLIError(str(e)) from e
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(
            f"learned {args.name} in {summary['learn_seconds']:.1f} s "
            f"({summary['threads']} torch threads): {path} ({summary['bytes']:,} bytes)"
        )
    return 0


def _cmd_concept_list(args: argparse.Namespace) -> int:
    from divergent.model.concept import default_concepts_dir, list_concepts

    folder = _concepts_dir(args) or default_concepts_dir()
    concepts = list_concepts(folder)
    if args.json:
        print(json.dumps(concepts, indent=1))
        return 0
    if not concepts:
        print(f"no concepts in {folder}")
        return 0
    print(f"concepts in {folder}:")
    for c in concepts:
        if "error" in c:
            print(f"  {c['name']}  UNREADABLE: {c['error']}")
            continue
        print(
            f"  {c['name']}  {c['bytes']:>8,} bytes  fraction {c['fraction']:g}  "
            f"steps {c['steps']}  from {', '.join(c['references'])}"
        )
    return 0


def _cmd_concept_remove(args: argparse.Namespace) -> int:
    from divergent.model.concept import ConceptError, remove_concept

    try:
        path = remove_concept(args.name, _concepts_dir(args))
    except ConceptError as e:
        raise CLIError(str(e)) from e
    print(f"removed {path}")
    return 0


def _cmd_evaluate_concept(args: argparse.Namespace) -> int:
    from divergent.model.concept_eval import ConceptProtocol, evaluate_concept

    _ensure_dataset(args.data)
    res = evaluate_concept(
        data=Path(args.data),
        model_dir=Path(args.model) if args.model else None,
        report=Path(args.report) if args.report else None,
        protocol=ConceptProtocol(steps=args.steps, seed=args.seed, threads=args.threads),
        progress=not args.json,
    )
    print(json.dumps(res, indent=None if args.json else 1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="divergent",
        description="Live human-AI music co-creation with a divergence knob.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build the training dataset")
    dsub = data.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="tokenize music21's corpus (and --midi folders)")
    b.add_argument("--out", default="data/dataset", help="dataset folder (default: %(default)s)")
    b.add_argument("--midi", action="append", metavar="DIR", help="add a folder of MIDI files")
    b.add_argument("--no-corpus", action="store_true", help="only the --midi folders")
    b.add_argument("--limit-per-source", type=int, default=None, help="for quick tests")
    b.add_argument(
        "--sources", default=None, help="comma-separated corpus collections (default: all)"
    )
    b.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_data_build)
    ix = dsub.add_parser("index", help="(re)build the readout's copy index and feature reference")
    ix.add_argument("--out", default="data/dataset", help="dataset folder (default: %(default)s)")
    ix.set_defaults(func=_cmd_data_index)

    t = sub.add_parser("train", help="train the transformer (needs the train extra)")
    from divergent.model.train_config import add_train_arguments

    add_train_arguments(t)
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("export", help="export a checkpoint to ONNX (fp32 + int8) with parity")
    e.add_argument("checkpoint", help="a checkpoint written by `divergent train`")
    e.add_argument("--out", default="model/bundled", help="output folder (default: %(default)s)")
    e.add_argument("--data", default="data/dataset", help="dataset for the parity check")
    e.add_argument("--parity-windows", type=int, default=32)
    e.set_defaults(func=_cmd_export)

    cr = sub.add_parser("critic", help="the domain critic BAD measures divergence with")
    crsub = cr.add_subparsers(dest="critic_command", required=True)
    ct = crsub.add_parser("train", help="train the critic of the corpus's collections")
    ct.add_argument("--data", default="data/dataset", help="dataset (default: %(default)s)")
    ct.add_argument("--out", default="runs/critic", help="output folder (default: %(default)s)")
    ct.add_argument("--steps", type=int, default=1500)
    ct.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ct.add_argument("--seed", type=int, default=0)
    ct.add_argument("--quiet", action="store_true", help="no progress bar")
    ct.add_argument("--json", action="store_true")
    ct.set_defaults(func=_cmd_critic_train)

    from divergent.model.bad_config import BAD_LATENTS, METHODS, BadConfig
    from divergent.model.files import DEVICE_CHOICES

    bd = sub.add_parser("bad", help="Bounded Adversarial Divergence fine-tuning of the decoder")
    bdsub = bd.add_subparsers(dest="bad_command", required=True)
    bt = bdsub.add_parser("train", help="fine-tune the decoder away from every class, bounded")
    bt.add_argument("--data", default=BadConfig.data, help="dataset (default: %(default)s)")
    bt.add_argument("--base", default=BadConfig.base, help="base weights (default: %(default)s)")
    bt.add_argument("--critic", default=BadConfig.critic, help="the frozen critic (%(default)s)")
    bt.add_argument("--out", default=BadConfig.out, help="output folder (default: %(default)s)")
    bt.add_argument("--method", default=BadConfig.method, choices=METHODS, help="gradient path")
    # defaults are BadConfig's: one declaration of the recipe
    bt.add_argument("--steps", type=int, default=BadConfig.steps)
    bt.add_argument("--max-minutes", type=float, default=BadConfig.max_minutes, help="budget")
    bt.add_argument("--batch-size", type=int, default=BadConfig.batch_size)
    bt.add_argument("--lr", type=float, default=BadConfig.lr)
    bt.add_argument("--class-weight", type=float, default=BadConfig.class_weight, help="push")
    bt.add_argument("--global-weight", type=float, default=BadConfig.global_weight, help="λ")
    bt.add_argument("--kl-weight", type=float, default=BadConfig.kl_weight, help="β, KL to base")
    bt.add_argument(
        "--base-weight",
        type=float,
        default=BadConfig.base_weight,
        help="MMD² weight to the base model's own (d = 0) answers; < 0 pushes away",
    )
    bt.add_argument("--sigma", type=float, default=BadConfig.sigma, help="kernel width")
    bt.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    bt.add_argument("--device", default=BadConfig.device, choices=DEVICE_CHOICES)
    bt.add_argument("--latents", default=BadConfig.latents, choices=BAD_LATENTS)
    bt.add_argument("--seed", type=int, default=BadConfig.seed)
    bt.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    bt.add_argument("--quiet", action="store_true", help="no progress bar")
    bt.add_argument("--json", action="store_true")
    bt.set_defaults(func=_cmd_bad_train)
    bx = bdsub.add_parser("export", help="add the BAD-tuned decoder (int8) to a model folder")
    bx.add_argument("checkpoint", help="model.pt written by `divergent bad train`")
    bx.add_argument("--out", default="model/bundled", help="model folder (default: %(default)s)")
    bx.set_defaults(func=_cmd_bad_export)

    g = sub.add_parser("generate", help="continue a MIDI prompt with the model")
    g.add_argument("prompt", help="a MIDI file")
    g.add_argument("--bars", type=int, default=4, help="bars to generate (default: 4)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument(
        "--divergence",
        type=float,
        default=0.0,
        help="the knob, 0..1: 0 = plain sampling, 1 = furthest from the training data",
    )
    g.add_argument("-o", "--output", required=True, help="output MIDI file")
    g.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    g.add_argument("--json", action="store_true", help="print a JSON summary")
    _add_concept_arguments(g, "answer in a learned concept")
    from divergent.model.generate import CONCEPT_STRENGTH, CONCEPT_STRENGTHS

    g.add_argument(
        "--concept-strength",
        type=float,
        default=CONCEPT_STRENGTH,
        metavar="G",
        help=f"how far the answer leans into the concept's style, "
        f"{CONCEPT_STRENGTHS[0]:g}..{CONCEPT_STRENGTHS[1]:g}: 1 = as learned, more = "
        f"pushed further (default: {CONCEPT_STRENGTH:g})",
    )
    _add_device_argument(g)
    g.set_defaults(func=_cmd_generate)

    from divergent.model.concept import MASK_MEASURES, LearnConfig

    co = sub.add_parser("concept", help="learn, list and remove named concepts (PPT)")
    cosub = co.add_subparsers(dest="concept_command", required=True)
    concepts_help = (
        "concepts folder (default: $DIVERGENT_CONCEPTS or ~/.local/share/divergent/concepts)"
    )
    cl = cosub.add_parser("learn", help="learn a concept from reference MIDI (needs torch)")
    cl.add_argument("name", help="the concept's name (letters, digits, _ . -)")
    cl.add_argument("refs", nargs="+", metavar="REF.mid", help="reference MIDI files")
    cl.add_argument(
        "--fraction",
        type=float,
        default=LearnConfig.fraction,
        help="pivotal share of each attention matrix (default: %(default)s)",
    )
    cl.add_argument(
        "--mask",
        default=LearnConfig.mask,
        choices=MASK_MEASURES,
        help="how entries are scored: the reference's Fisher over base samples' "
        "(specific) or the reference's alone (fisher); default: %(default)s",
    )
    cl.add_argument(
        "--steps", type=int, default=LearnConfig.steps, help="tuning steps (default: %(default)s)"
    )
    cl.add_argument(
        "--prompted",
        type=float,
        default=LearnConfig.prompted,
        metavar="F",
        help="share of training windows behind a foreign 2-bar prompt, as answers are "
        "(default: %(default)s)",
    )
    cl.add_argument("--seed", type=int, default=0)
    cl.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    cl.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    cl.add_argument("--concepts", default=None, metavar="DIR", help=concepts_help)
    cl.add_argument("--json", action="store_true", help="print a JSON summary, no progress bar")
    cl.add_argument(
        "--nice",
        type=int,
        default=0,
        metavar="N",
        help="lower this process's priority by N first (the live server uses 10)",
    )
    cl.set_defaults(func=_cmd_concept_learn)
    cls_ = cosub.add_parser("list", help="the learned concepts")
    cls_.add_argument("--concepts", default=None, metavar="DIR", help=concepts_help)
    cls_.add_argument("--json", action="store_true")
    cls_.set_defaults(func=_cmd_concept_list)
    cr_ = cosub.add_parser("remove", help="delete a concept")
    cr_.add_argument("name")
    cr_.add_argument("--concepts", default=None, metavar="DIR", help=concepts_help)
    cr_.set_defaults(func=_cmd_concept_remove)

    ev = sub.add_parser("evaluate", help="measure the model")
    evsub = ev.add_subparsers(dest="evaluate_command", required=True)
    nll = evsub.add_parser("nll", help="validation NLL of the ONNX model vs an n-gram baseline")
    nll.add_argument("--data", default="data/dataset")
    nll.add_argument("--model", default=None)
    nll.add_argument("--max-tokens", type=int, default=None)
    nll.add_argument("--order", type=int, default=None, help="n-gram order (default: best 3..6)")
    nll.add_argument("--json", action="store_true")
    nll.set_defaults(func=_cmd_evaluate_nll)
    dv = evsub.add_parser("divergence", help="the knob's effect: metrics vs d, and vs temperature")
    dv.add_argument("--data", default="data/dataset")
    dv.add_argument("--model", default=None)
    dv.add_argument("--report", default=None, metavar="DIR", help="write plots and README.md")
    dv.add_argument("--prompts", type=int, default=16)
    dv.add_argument("--samples", type=int, default=4)
    dv.add_argument("--seed", type=int, default=0)
    dv.add_argument(
        "--paper-seed-sets",
        type=int,
        default=None,
        help="the paper table's T = 1 row on this many seed sets (default: the protocol's)",
    )
    dv.add_argument("--json", action="store_true")
    dv.set_defaults(func=_cmd_evaluate_divergence)
    lt = evsub.add_parser("latent", help="is the latent used? KL and output statistics vs z")
    lt.add_argument("--data", default="data/dataset")
    lt.add_argument("--model", default=None)
    lt.add_argument("--json", action="store_true")
    lt.set_defaults(func=_cmd_evaluate_latent)
    ec = evsub.add_parser("concept", help="concept learning: PPT vs full, LoRA, token only")
    ec.add_argument("--data", default="data/dataset")
    ec.add_argument("--model", default=None)
    ec.add_argument("--report", default=None, metavar="DIR", help="write plots and README.md")
    ec.add_argument(
        "--steps",
        type=int,
        default=LearnConfig.steps,
        help="tuning steps of every method (default: %(default)s)",
    )
    ec.add_argument("--seed", type=int, default=0)
    ec.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ec.add_argument("--json", action="store_true")
    ec.set_defaults(func=_cmd_evaluate_concept)

    sv = sub.add_parser("serve", help="the live server: MIDI/OSC in, answers out, recorded")
    from divergent.server.config import add_serve_arguments

    add_serve_arguments(sv)
    sv.set_defaults(func=_cmd_serve)

    po = sub.add_parser("ports", help="list MIDI ports")
    from divergent.server.config import MIDI_BACKENDS

    po.add_argument("--midi-backend", default=None, choices=MIDI_BACKENDS)
    po.add_argument("--json", action="store_true")
    po.set_defaults(func=_cmd_ports)

    se = sub.add_parser("sessions", help="list recorded takes (recovering crashed ones)")
    se.add_argument("--sessions", default=None, metavar="DIR", help="sessions folder")
    se.add_argument("--json", action="store_true")
    se.set_defaults(func=_cmd_sessions)

    be = sub.add_parser("bench", help="benchmarks that print JSON")
    besub = be.add_subparsers(dest="bench_command", required=True)
    bm = besub.add_parser("model", help="per-token latency, bar latency, note events/s")
    bm.add_argument("--model", default=None)
    bm.add_argument("--repeats", type=int, default=200)
    bm.add_argument("--json", action="store_true")
    _add_concept_arguments(bm, "measure a learned concept beside the base model")
    _add_device_argument(bm)
    bm.set_defaults(func=_cmd_bench_model)
    bl = besub.add_parser("live", help="the live path with real JACK and OSC peers")
    bl.add_argument("--answers", type=int, default=30, help="phrases to answer")
    bl.add_argument("--flood-seconds", type=float, default=10.0)
    bl.add_argument(
        "--jack-period",
        type=int,
        default=64,
        metavar="FRAMES",
        help="frames per period of the JACK dummy server it starts when none runs "
        "(48 kHz; default 64 = 1.3 ms)",
    )
    bl.add_argument(
        "--mqtt-outage",
        type=float,
        default=None,
        metavar="S",
        help="instead: jam while the MQTT broker is down for S seconds (needs mosquitto)",
    )
    bl.add_argument(
        "--web-clients",
        type=int,
        default=0,
        metavar="N",
        help="instead: the phrases twice, without and with N pages on the browser view "
        "(onset error and loop lag p99 side by side)",
    )
    bl.add_argument(
        "--learning",
        action="store_true",
        help="instead: the phrases twice, alone and while a concept is learned from them "
        "in the background (onset error and loop lag p99 side by side)",
    )
    bl.add_argument("--json", action="store_true")
    bl.set_defaults(func=_cmd_bench_live)
    bs = besub.add_parser("soak", help="a scripted performer for M minutes, measured per minute")
    bs.add_argument("--minutes", type=float, required=True, help="how long (0.5: 30 s)")
    bs.add_argument(
        "--window-seconds",
        type=float,
        default=60.0,
        metavar="S",
        help="one row of figures per S seconds (default: a minute)",
    )
    bs.add_argument(
        "--jack-period",
        type=int,
        default=64,
        metavar="FRAMES",
        help="frames per period of the JACK dummy server it starts, a named one of its own "
        "(48 kHz; default 64 = 1.3 ms)",
    )
    bs.add_argument(
        "--concepts",
        default=None,
        metavar="DIR",
        help="the server's concepts folder (default: its own); the performer switches "
        "between the concepts in it",
    )
    bs.add_argument(
        "--warm-prefills",
        type=int,
        default=None,
        metavar="N",
        help="the server's --warm-prefills (default: the server's own default)",
    )
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(func=_cmd_bench_soak)
    return p


def _add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``, as ``serve`` declares it (its choices and help: ServeConfig's)."""
    from divergent.server.config import ServeConfig

    rule = ServeConfig.rule("device")
    parser.add_argument(
        "--device",
        default=ServeConfig().device,
        choices=rule["choices"],
        help=f"{rule['doc']}; default: %(default)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``divergent`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # our own loggers at INFO; libraries (ONNX Runtime's quantizer logs on the root
    # logger) only from WARNING
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("divergent",):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args))
    except (CLIError, FileNotFoundError) as e:
        print(f"divergent: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
