"""The flags every training job takes, their argparse types, and the DeepSpeed config they edit.

A job (pre-training, fine-tuning) adds its own data and model flags, the data flags both share
with :func:`add_feature_args` and :func:`add_loading_args`, and parses with
:func:`parse_job_args`, which adds the rest (:func:`add_training_args`): optimisation (optimizer,
schedule, batch geometry, ZeRO stage, precision, seed, capture) and the run (output directory,
logging, evaluation, checkpoints, resume, export, processes). Values are range-checked by
argparse, so ``--lr 0`` or ``--max_steps -5`` is an error naming the flag, never a default.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

MAX_SEED = 2**31 - 1  # the per-step reseed (seed * 1_000_003 + micro_step) * 4099 + rank stays below 2**64


def int_flag(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]. argparse names the flag in the error, this says
    what was expected and what was found (a 0 or -1 no longer falls back to a default or a loop bound)."""
    want = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {want}, got {value}")
        return value

    return parse


def float_flag(low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite number in [low, high], or (low, high] with ``low_open``; NaN and
    Inf are refused (a NaN weight or rate trains NaN)."""
    if high == math.inf:
        want = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        want = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text}")
        return value

    return parse


PROBABILITY = float_flag(0.0, 1.0)


def add_feature_args(d, root: str, *, data_dir_help: str, fp16_help: str) -> None:
    """Add the data flags every job shares to the argument group ``d``: ``--data_dir`` (default
    ROOT/runs/synthetic_data), ``--features``, ``--store_dir`` and ``--fp16_features``; the help
    texts that differ between jobs are passed in."""
    d.add_argument("--data_dir", default=os.path.join(root, "runs", "synthetic_data"), help=data_dir_help)
    d.add_argument("--features", help="comma-separated feature TSV files and/or converted store directories")
    d.add_argument(
        "--store_dir",
        help="where TSVs are converted to a memory-mapped store (default DATA_DIR/feature_store); a store "
        "converted from other files is rebuilt there by default, refused when named here",
    )
    d.add_argument("--fp16_features", action=argparse.BooleanOptionalAction, default=True, help=fp16_help)


def add_loading_args(d, *, max_seq_len_help: str, num_boxes_help: str) -> None:
    """Add the input-shape and loader flags every job shares to the argument group ``d``:
    ``--max_seq_len``, ``--num_boxes`` (both None: the job resolves them from its data),
    ``--num_workers`` and ``--synthetic_images``."""
    d.add_argument("--max_seq_len", type=int_flag(3), default=None, help=max_seq_len_help)
    d.add_argument("--num_boxes", type=int_flag(1), default=None, help=num_boxes_help)
    d.add_argument(
        "--num_workers", type=int_flag(0), default=None, help="loader workers (default 0 on CPU, 4 on GPU)"
    )
    d.add_argument(
        "--synthetic_images", type=int_flag(1), default=1000, help="training images when generating"
    )


@dataclass(frozen=True)
class JobDefaults:
    """A job's defaults for the shared flags (None: the job resolves it at run time)."""

    output_name: str  # OUTPUT = ROOT/runs/<output_name>
    lr: str  # the help text's words; the job resolves --lr None itself
    epochs: str
    warmup_ratio: float = 0.05
    eval_every: int = 200
    save_every: int = 200


def add_training_args(
    p: argparse.ArgumentParser, defaults: JobDefaults, root: str
) -> argparse.ArgumentParser:
    """Add the optimisation, run and DeepSpeed flags to ``p`` (returned: DeepSpeed's own helper
    returns the parser it extends)."""
    o = p.add_argument_group("optimisation")
    o.add_argument(
        "--optimizer",
        choices=("adamw", "bert_adam"),
        default="adamw",
        help="torch AdamW, or the authors' Adam without bias correction",
    )
    o.add_argument(
        "--lr",
        type=float_flag(0.0, low_open=True),
        default=None,
        help=f"peak learning rate (default {defaults.lr})",
    )
    o.add_argument("--warmup_ratio", type=PROBABILITY, default=defaults.warmup_ratio)
    o.add_argument("--weight_decay", type=float_flag(0.0), default=0.01)
    o.add_argument("--adam_eps", type=float_flag(0.0, low_open=True), default=1e-6)
    o.add_argument(
        "--fused_optimizer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fused/multi-tensor optimizer step (default: fused AdamW on CUDA, multi-tensor otherwise); "
        "--no-fused_optimizer: the per-parameter loop",
    )
    o.add_argument(
        "--epochs",
        type=float_flag(0.0, low_open=True),
        default=None,
        help=f"passes over the training set (default {defaults.epochs})",
    )
    o.add_argument(
        "--max_steps",
        type=int_flag(1),
        default=None,
        help="optimizer steps (overrides --epochs)",
    )
    o.add_argument("--micro_batch", type=int_flag(1), help="override train_micro_batch_size_per_gpu")
    o.add_argument("--grad_accum", type=int_flag(1), help="override gradient_accumulation_steps")
    o.add_argument("--zero_stage", type=int, choices=(0, 1, 2, 3), help="override zero_optimization.stage")
    o.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto: ds.json's bf16/fp16 if enabled there, else bf16 on GPU and fp32 on CPU",
    )
    o.add_argument("--seed", type=int_flag(0, MAX_SEED), default=0)
    o.add_argument(
        "--capture",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the model's forward, losses and backward with torch.compile and, on CUDA, replay "
        "them as CUDA graphs (default: on with CUDA, off on CPU); --no-capture: run eagerly",
    )
    o.add_argument("--compile_backend", default="inductor", help=argparse.SUPPRESS)

    r = p.add_argument_group("run")
    r.add_argument("--output_dir", default=os.path.join(root, "runs", defaults.output_name))
    r.add_argument("--log_every", type=int_flag(1), default=10)
    r.add_argument("--eval_every", type=int_flag(0), default=defaults.eval_every, help="0: never evaluate")
    r.add_argument(
        "--eval_batches", type=int_flag(1), default=None, help="limit held-out batches per evaluation"
    )
    r.add_argument("--save_every", type=int_flag(0), default=defaults.save_every, help="0: no checkpoints")
    r.add_argument(
        "--keep_checkpoints", type=int_flag(0), default=2, help="checkpoints of this run kept (0: all)"
    )
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUTPUT: from the checkpoint OUTPUT/checkpoints/latest names, or the "
        "newest complete one if that is missing or incomplete",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an OUTPUT that holds another run: first DELETES its checkpoints/, "
        "log.jsonl, export/ and tensorboard/ (without --resume or --overwrite such an OUTPUT is refused)",
    )
    r.add_argument("--no_export", action="store_true")
    r.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also write the logged values to OUTPUT/tensorboard (default: on when the tensorboard package "
        "is installed, said in the start-up line); --tensorboard without it installed is an error",
    )
    r.add_argument("--no_progress", action="store_true")
    r.add_argument(
        "--cpu_threads",
        type=int_flag(1),
        default=None,
        help="torch threads per process on CPU (default: cores / local processes - 1, at least 1; "
        "oversubscribed OpenMP threads spin and run many times slower)",
    )
    r.add_argument(
        "--shm_comm", action="store_true", help="CPU: use DeepSpeed's shared-memory allreduce (JIT-built)"
    )
    r.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    r.add_argument("--kill_after_step", type=int, default=None, help=argparse.SUPPRESS)
    # Tests: the process stops (SIGSTOP) after this step, alive but silent: a hung node.
    r.add_argument("--stop_after_step", type=int, default=None, help=argparse.SUPPRESS)
    # Tests: seconds each evaluation sleeps, to check that samples/s leaves evaluations out.
    r.add_argument("--eval_delay", type=float, default=0.0, help=argparse.SUPPRESS)

    r.add_argument(
        "--dist_timeout",
        type=float_flag(0.0, low_open=True),
        default=10.0,
        help="minutes a collective waits for the other ranks before the job stops with an error "
        "(a dead node ends the job instead of hanging it)",
    )
    r.add_argument(
        "--per_rank_log",
        action="store_true",
        help="also write each rank's own training losses and accuracies to OUTPUT/log.rank<R>.jsonl "
        "(log.jsonl holds the averages over all ranks)",
    )
    r.add_argument(
        "--storage",
        choices=("auto", "shared", "node-local"),
        default="auto",
        help="are --output_dir and the data directories shared by all nodes, or one per node? auto: "
        "detected from a marker file rank 0 writes (README: Scaling out)",
    )

    import deepspeed

    return deepspeed.add_config_arguments(p)


def parse_job_args(
    p: argparse.ArgumentParser,
    defaults: JobDefaults,
    root: str,
    argv: list[str] | None,
    validate: Callable[[argparse.ArgumentParser, argparse.Namespace], None],
) -> argparse.Namespace:
    """A job's flags: its parser ``p`` with :func:`add_training_args`' flags added and
    ``default_config`` set (ROOT/ds.json, the DeepSpeed config without --deepspeed_config), ``argv``
    parsed and checked across flags by the job's ``validate(parser, args)``."""
    p = add_training_args(p, defaults, root)
    p.set_defaults(default_config=os.path.join(root, "ds.json"))
    args = p.parse_args(argv)
    validate(p, args)
    return args


def tensorboard_choice(flag: bool | None, installed: bool) -> tuple[bool, str]:
    """(write TensorBoard events?, the start-up line's words for it) from --tensorboard / --no-tensorboard
    (None: the default, on when installed). --tensorboard without the package stops the run."""
    if flag is None:
        flag = installed
    elif flag and not installed:
        raise SystemExit(
            "--tensorboard: the tensorboard package is not installed (pip install tensorboard), "
            "or pass --no-tensorboard"
        )
    return flag, ("TensorBoard in OUTPUT/tensorboard" if flag else "no TensorBoard")


def tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def ds_config(args: argparse.Namespace, cuda: bool, world: int = 1, default_path: str = "ds.json") -> dict:
    """The DeepSpeed config: ds.json (or --deepspeed_config) with the flags applied.

    ``train_batch_size`` (DeepSpeed: micro batch x accumulation x world size) is honoured: without an
    accumulation in the file or --grad_accum it sets the accumulation (it must divide by micro batch x
    world size); with one it must agree. Either way the run's batch is what the file says, or an error."""
    path = args.deepspeed_config or default_path
    with open(path) as f:
        config = json.load(f)
    config.setdefault("train_micro_batch_size_per_gpu", 32)
    accum_given = args.grad_accum is not None or "gradient_accumulation_steps" in config
    config.setdefault("gradient_accumulation_steps", 1)
    total = config.pop("train_batch_size", None)
    if args.micro_batch is not None:
        config["train_micro_batch_size_per_gpu"] = args.micro_batch
    if args.grad_accum is not None:
        config["gradient_accumulation_steps"] = args.grad_accum
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 1:
            raise SystemExit(f"{path}: {key}: expected a positive integer, got {config[key]!r}")
    if total is not None:
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise SystemExit(f"{path}: train_batch_size: expected a positive integer, got {total!r}")
        micro = config["train_micro_batch_size_per_gpu"]
        if not accum_given:
            if total % (micro * world):
                raise SystemExit(
                    f"{path}: train_batch_size {total} is not a multiple of micro batch {micro} x world size "
                    f"{world}; change it, or give gradient_accumulation_steps (or --grad_accum) instead"
                )
            config["gradient_accumulation_steps"] = total // (micro * world)
        accum = config["gradient_accumulation_steps"]
        if micro * accum * world != total:
            raise SystemExit(
                f"{path}: train_batch_size {total} disagrees with micro batch {micro} x gradient accumulation "
                f"{accum} x world size {world} = {micro * accum * world} (--micro_batch / --grad_accum override "
                "the file); make them agree, or remove train_batch_size"
            )
    if args.zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    precision = args.precision
    if precision == "auto":
        enabled = [k for k in ("bf16", "fp16") if config.get(k, {}).get("enabled")]
        precision = enabled[0] if enabled else ("bf16" if cuda else "fp32")
    config["bf16"] = {**config.get("bf16", {}), "enabled": precision == "bf16"}
    config["fp16"] = {**config.get("fp16", {}), "enabled": precision == "fp16"}
    config["zero_allow_untested_optimizer"] = True
    config.setdefault("steps_per_print", 10**9)
    return config


def total_steps_of(
    args: argparse.Namespace, per_epoch: int, default_epochs: float, default_steps: int | None = None
) -> int:
    """Optimizer steps of the run: --max_steps, else --epochs x steps per epoch; with neither,
    ``default_steps`` if the job gives one (the synthetic sets on the CPU: their epochs are a few
    steps), else ``default_epochs`` epochs."""
    if args.max_steps is not None:
        return args.max_steps
    if args.epochs is None and default_steps is not None:
        return default_steps
    epochs = default_epochs if args.epochs is None else args.epochs
    steps = int(epochs * per_epoch)
    if steps < 1:
        raise SystemExit(
            f"--epochs {epochs:g}: {epochs:g} x {per_epoch} optimizer steps per epoch is less than one step; "
            "give more epochs or --max_steps"
        )
    return steps


# Flags a resumed run must share with its checkpoint: they fix the data order (seed, batch
# geometry, data), the optimizer state's layout (ZeRO stage, world size, precision, optimizer)
# or the model's inputs. Flags in RESUME_CHANGEABLE may change; the message says what it does.
# A job adds its own to both (its data, model and loss flags).
RESUME_FIXED = {
    "world": "the world size (processes)",
    "micro_batch": "--micro_batch",
    "grad_accum": "--grad_accum",
    "zero_stage": "--zero_stage",
    "precision": "--precision",
    "optimizer": "--optimizer",
    "weight_decay": "--weight_decay",
    "adam_eps": "--adam_eps",
    "seed": "--seed",
}
RESUME_CHANGEABLE = {
    "lr": ("--lr", "the new peak learning rate applies from this step (same warmup and decay shape)"),
    "total_steps": (
        "--max_steps / --epochs",
        "the warmup and decay schedule is recomputed for the new length",
    ),
    "warmup_ratio": ("--warmup_ratio", "the schedule is recomputed with the new warmup"),
}


def resume_changes(
    recorded: dict | None,
    current: dict,
    checkpoint: str,
    fixed_flags: dict[str, str] = RESUME_FIXED,
    changeable_flags: dict[str, tuple[str, str]] = RESUME_CHANGEABLE,
) -> tuple[str | None, list[str]]:
    """Compare the flags ``checkpoint`` was trained with (``recorded``) with this run's.
    Returns (an error naming every flag that cannot change, or None; notes on allowed changes)."""
    if not recorded:
        return None, [
            f"--resume: {checkpoint} records no flags (saved by an older version): changes not checked"
        ]
    fixed = [
        f"{name} {recorded.get(key)!r} (now {current.get(key)!r})"
        for key, name in fixed_flags.items()
        if key in recorded and recorded[key] != current.get(key)
    ]
    error = None
    if fixed:
        error = (
            f"--resume: {checkpoint} was trained with {'; '.join(fixed)}. These cannot change when resuming "
            "(they fix the data order, the optimizer state's layout or the model's inputs): pass the values "
            "it was trained with, or start a new run (--overwrite, or another --output_dir)"
        )
    notes = [
        f"--resume: {name} changed from {recorded[key]!r} to {current.get(key)!r}: {effect}"
        for key, (name, effect) in changeable_flags.items()
        if key in recorded and recorded[key] != current.get(key)
    ]
    return error, notes
