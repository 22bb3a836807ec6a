"""``agentgym-jax`` command line: train | eval | export | plan | serve-env | plot | pretrain-tiny | envs | generate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("agentgym_jax")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Third-party chatter (orbax, absl) drowns the progress bar at INFO.
    for name in ("absl", "orbax", "jax._src", "httpx", "grain"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _init_distributed() -> None:
    """``jax.distributed.initialize`` from the environment, before anything touches jax.

    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` name the job;
    without them jax detects TPU pods and SLURM itself. The coordinator listens on
    ``JAX_COORDINATOR_BIND_ADDRESS``; a loopback coordinator (127.0.0.1, localhost) listens on
    loopback only by default, since jax's own default is every interface."""
    import jax

    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise SystemExit(
                f"agentgym-jax --distributed: JAX_COORDINATOR_ADDRESS is set but {missing} not"
            )
        addr = env["JAX_COORDINATOR_ADDRESS"]
        bind = env.get("JAX_COORDINATOR_BIND_ADDRESS")
        if bind is None and addr.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
            bind = "127.0.0.1:" + addr.rsplit(":", 1)[1]
        if env.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=addr,
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
            coordinator_bind_address=bind,
        )
    else:  # TPU pods and SLURM are detected by jax itself
        jax.distributed.initialize()
    log.info(
        "process %d of %d, %d global devices (%d local)",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.local_device_count(),
    )


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (configs/*.yaml)")
    p.add_argument("--output-dir", help="run directory (trainer.output_dir)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. rollout.n=4")


def _add_passthrough(sub, name: str, help: str, fn) -> None:
    """A subcommand whose arguments (``--help`` included) all go to another script's parser."""
    p = sub.add_parser(name, help=help, add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=fn)


def _load(args, extra=()):
    from agentgym_jax.config import load_config

    overrides = list(args.overrides) + list(extra)
    if getattr(args, "output_dir", None):
        overrides.append(f"trainer.output_dir={args.output_dir}")
    return load_config(args.config, overrides)


def cmd_train(args) -> int:
    from agentgym_jax.trainer import train

    extra = [f"trainer.total_training_steps={args.steps}"] if args.steps is not None else []
    cfg = _load(args, extra)
    summary = train(cfg)
    return 0 if summary.get("ok", True) else 1


def cmd_eval(args) -> int:
    from agentgym_jax.trainer import evaluate_cli

    cfg = _load(args)
    evaluate_cli(cfg, checkpoint_dir=args.checkpoint, num_tasks=args.num_tasks, split=args.split)
    return 0


def cmd_export(args) -> int:
    from agentgym_jax.trainer import export_checkpoint

    cfg = _load(args)
    path = export_checkpoint(cfg, args.out, step=args.step, dtype=args.dtype)
    print(path)
    return 0


def cmd_serve_env(args) -> int:
    from envs import server

    return server.main(args.rest) or 0


def cmd_plot(args) -> int:
    from agentgym_jax.metrics import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def cmd_pretrain_tiny(args) -> int:
    from agentgym_jax.recipes import tiny_babyai

    return tiny_babyai.main(args.rest) or 0


def cmd_envs(args) -> int:
    import envs

    for name in envs.list_envs():
        print(name)
    return 0


def cmd_generate(args) -> int:
    """Smoke run: load a model + tokenizer, generate a reply to a prompt."""
    from agentgym_jax.engine import generate
    from agentgym_jax.models import from_pretrained, load_tokenizer, resolve_model_path

    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    model = from_pretrained(path)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    stop = [
        tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eot_id|>") if t in tok.get_vocab()
    ]
    out = generate(
        model,
        [list(ids)],
        args.max_new_tokens,
        temperature=args.temperature,
        stop_token_ids=stop or model.config.eos_token_ids,
        seed=args.seed,
    )[0]
    print(tok.decode(out, skip_special_tokens=True))
    return 0


def cmd_plan(args) -> int:
    """Ahead-of-time compile a config's step functions for a TPU slice; memory and fit report."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiles target the TPU description only
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from agentgym_jax import plan

    extra = [f"model.path={args.model}"] if args.model else []
    cfg = _load(args, extra)
    mesh_given = any(o.startswith("mesh.") for o in args.overrides)
    only = tuple(args.only.split(",")) if args.only else None
    try:
        report = plan.plan(cfg, args.topology, suggest_mesh=not mesh_given, only=only)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # slice, model, mesh, libtpu
        print(f"agentgym-jax plan: {e}", file=sys.stderr)
        return 2
    print(report.format())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0 if report.fits else 3


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="agentgym-jax",
        description="Multi-turn agentic RL for LLMs on JAX (AgentGym-RL, ScalingInter-RL).",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host TPU pods, SLURM/GPU clusters; "
        "coordinator from the environment or JAX_COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID)",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="RL training (resumes automatically from the output dir)")
    _add_config_args(p)
    p.add_argument("--steps", type=int, help="total training steps (trainer.total_training_steps)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="success rate / mean turns on held-out tasks, with transcripts")
    _add_config_args(p)
    p.add_argument(
        "--checkpoint", help="run dir whose latest checkpoint to evaluate (default: model.path)"
    )
    p.add_argument("--num-tasks", type=int, help="held-out tasks (default data.val_batch_size)")
    p.add_argument("--split", default=None, help="task split (default env.test_split)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser(
        "plan",
        help="compile a config's step for a TPU slice from this host: per-device memory, fits?",
        description="Builds abstract state from the model config alone (no weights) and compiles "
        "engine prefill/append/decode, the log-prob pass and the actor/critic updates ahead of "
        "time for the slice. Without mesh.* overrides it suggests a mesh (the first that fits). "
        "Exit status 3 when it does not fit.",
    )
    _add_config_args(p)
    p.add_argument(
        "--topology",
        default="v5e-4",
        help="TPU slice: v5e-16, v4-32, v5p-8, ... or a topology name such as v5e:4x4",
    )
    p.add_argument(
        "--model",
        help="model shapes: a local dir / config.json, or a built-in name (Qwen2.5-7B, "
        "Qwen2.5-3B, Qwen2.5-1.5B, Qwen2.5-0.5B, Qwen3-4B, Qwen3-8B, Llama-3.1-8B)",
    )
    p.add_argument("--only", help="comma-separated subset of functions to compile")
    p.add_argument("--json", help="also write the report as JSON here")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("export", help="write the trained actor as a HF safetensors directory")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="destination directory")
    p.add_argument("--step", type=int, help="checkpoint step (default latest)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.set_defaults(fn=cmd_export)

    _add_passthrough(
        sub, "serve-env", "serve an env over the AgentGym HTTP protocol", cmd_serve_env
    )

    p = sub.add_parser("plot", help="PNG curves from RUN_DIR/metrics.jsonl")
    p.add_argument("run_dir")
    p.add_argument("--out")
    p.set_defaults(fn=cmd_plot)

    _add_passthrough(
        sub, "pretrain-tiny", "rebuild the embedded tiny tokenizer + base model", cmd_pretrain_tiny
    )

    p = sub.add_parser("envs", help="list registered environments")
    p.set_defaults(fn=cmd_envs)

    p = sub.add_parser("generate", help="smoke run: load a model and generate")
    p.add_argument("--model", default="builtin:tiny-babyai")
    p.add_argument("--prompt", default="Hello")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_generate)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "pretrain-tiny" in argv:
        # argparse's REMAINDER drops a first argument that looks like an option ("--steps"):
        # hand everything after the subcommand to the pretraining script's own parser.
        i = argv.index("pretrain-tiny")
        args = build_parser().parse_args(argv[: i + 1])
        args.rest = argv[i + 1 :]
    else:
        args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.distributed:
        _init_distributed()
    from agentgym_jax.config_tree import ConfigError

    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"agentgym-jax: config error: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, RuntimeError) as e:
        from agentgym_jax.checkpoint import NoLoadableCheckpointError
        from agentgym_jax.trainer import AllEnvsFailedError

        if not isinstance(e, (FloatingPointError, AllEnvsFailedError, NoLoadableCheckpointError)):
            raise
        # Run-level stops with their own explanation: one line, no traceback, exit 1.
        print(f"agentgym-jax: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
