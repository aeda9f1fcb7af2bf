"""LXMERT pre-training under DeepSpeed ZeRO.

    deepspeed train.py --deepspeed_config ds.json             # synthetic data, CPU or GPU
    deepspeed --num_gpus 4 train.py --deepspeed_config ds.json --data_dir /data/lxmert ...
    python train.py --deepspeed_config ds.json                # one process, no launcher

With no data arguments the synthetic set (``python -m lxmert_fast.data.synthetic``) is
generated into ``--data_dir`` (or reused) and converted once to a memory-mapped feature
store. Batch size, gradient accumulation, clipping, ZeRO stage and precision come from
ds.json (flags override). Rank 0 shows a progress bar, appends per-task losses and
accuracies to ``OUTPUT/log.jsonl``, evaluates on the held-out split every ``--eval_every``
steps, saves DeepSpeed checkpoints every ``--save_every`` steps and exports the model in
Hugging Face format to ``OUTPUT/export``. ``--resume`` continues from the latest checkpoint
with the same step, schedule, data order and random streams: every random draw (data,
dropout, object masking) is a function of (seed, rank, micro-step), not of process history.

Bad input stops the run with a message naming the flag, file or image: flags are range-checked
by argparse (``--lr 0`` or ``--max_steps -5`` is an error, not a default); each batch gets the
model's value checks on the host (the model's own are off so the step never waits on the GPU); a
NaN or Inf loss stops every rank, naming the step and the loss term, exit status 1 — read from
device-side flags once per ``--log_every`` window and before each checkpoint and the export,
never per step. On ``--resume`` the flags recorded with the checkpoint are compared with this
run's: one that fixes the data order or the optimizer state (micro batch, accumulation, ZeRO
stage, world size, precision, optimizer, seed, data, ...) is refused if changed; a change of
``--lr``, the run length, the loss weights or the masking rates is announced and applies from
the resumed step.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import signal
import socket
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = os.path.dirname(os.path.abspath(__file__))
TASKS = ("mlm", "matched", "obj", "qa")
VISUAL_LOSSES = ("obj", "attr", "feat")
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data (default: the synthetic set in --data_dir)")
    d.add_argument(
        "--data_dir",
        default=os.path.join(REPO, "runs", "synthetic_data"),
        help="directory of the data; generated synthetic data if it has no meta.json and no --train",
    )
    d.add_argument("--train", help="comma-separated pre-training JSON files (authors' format)")
    d.add_argument("--valid", help="comma-separated held-out pre-training JSON files")
    d.add_argument("--features", help="comma-separated feature TSV files and/or converted store directories")
    d.add_argument(
        "--store_dir",
        help="where TSVs are converted to a memory-mapped store (default DATA_DIR/feature_store); a store "
        "converted from other files is rebuilt there by default, refused when named here",
    )
    d.add_argument("--fp16_features", action="store_true", help="store converted features as float16")
    d.add_argument("--vocab", help="WordPiece vocab.txt (default DATA_DIR/vocab.txt)")
    d.add_argument(
        "--answer_table", help="answer table JSON, list of {ans, dsets} (default DATA_DIR/all_ans.json)"
    )
    d.add_argument("--answer_dsets", default="vqa,gqa,visual7w", help="keep answers of these datasets")
    d.add_argument(
        "--object_words",
        help="file of object nouns for the masked-object-word probe "
        "(default DATA_DIR/object_words.txt if present)",
    )
    d.add_argument(
        "--max_seq_len",
        type=int_flag(3),
        default=None,
        help="[CLS] + words + [SEP], padded (default 20, the authors'; 12 for the synthetic set)",
    )
    d.add_argument(
        "--num_boxes",
        type=int_flag(1),
        default=None,
        help="boxes per image (default 36; the synthetic set's own count)",
    )
    d.add_argument(
        "--num_workers", type=int_flag(0), default=None, help="loader workers (default 0 on CPU, 4 on GPU)"
    )
    d.add_argument(
        "--synthetic_images", type=int_flag(1), default=1000, help="training images when generating"
    )

    m = p.add_argument_group("model")
    m.add_argument(
        "--preset",
        choices=("tiny", "small", "paper"),
        default=None,
        help="model size (default paper on GPU, small on CPU)",
    )

    t = p.add_argument_group("tasks (authors' weights are all 1; visual losses carry 1/obj_mask_rate)")
    for task in TASKS:
        t.add_argument(f"--task_{task}", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--visual_losses", default="obj,attr,feat", help="subset of obj,attr,feat")
    for loss in ("mlm", "matched", "obj", "attr", "feat", "qa"):
        t.add_argument(f"--weight_{loss}", type=float_flag(0.0), default=1.0)
    t.add_argument(
        "--obj_loss_on",
        choices=("all", "masked"),
        default="all",
        help="obj/attr cross-entropy over all objects (authors' code, default) or masked ones only",
    )
    t.add_argument(
        "--qa_schedule",
        choices=("constant", "authors"),
        default="constant",
        help="constant: QA weight 1 throughout (released code); authors: 0 for the first half, then 2",
    )
    t.add_argument("--word_mask_rate", type=PROBABILITY, default=0.15)
    t.add_argument(
        "--obj_mask_rate",
        type=float_flag(0.0, 1.0, low_open=True),
        default=0.15,
        help="probability an object is masked, in (0, 1]: visual losses are scaled by its inverse "
        "(--no-task_obj turns them off)",
    )
    t.add_argument(
        "--mismatch_rate", type=PROBABILITY, default=0.5, help="probability the sentence is replaced"
    )

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
        help="peak learning rate (default 1e-4 paper, 1e-3 small/tiny)",
    )
    o.add_argument("--warmup_ratio", type=PROBABILITY, default=0.05)
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
        help="passes over the training set (default 20; on the synthetic set on CPU, 1000 steps "
        "unless --epochs or --max_steps is given)",
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
    r.add_argument("--output_dir", default=os.path.join(REPO, "runs", "pretrain"))
    r.add_argument("--log_every", type=int_flag(1), default=10)
    r.add_argument("--eval_every", type=int_flag(0), default=200, help="0: never evaluate")
    r.add_argument(
        "--eval_batches", type=int_flag(1), default=None, help="limit held-out batches per evaluation"
    )
    r.add_argument("--save_every", type=int_flag(0), default=200, help="0: no checkpoints")
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
    # Tests: seconds each evaluation sleeps, to check that samples/s leaves evaluations out.
    r.add_argument("--eval_delay", type=float, default=0.0, help=argparse.SUPPRESS)

    import deepspeed

    p = deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    validate_args(p, args)
    return args


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks across flags and of list-valued flags; errors the argparse way (usage, exit 2)."""
    visual = [v for v in args.visual_losses.split(",") if v]
    unknown = [v for v in visual if v not in VISUAL_LOSSES]
    if unknown:
        parser.error(
            f"argument --visual_losses: expected a comma-separated subset of {','.join(VISUAL_LOSSES)}, "
            f"got {args.visual_losses!r}"
        )
    if not any(getattr(args, f"task_{t}") for t in TASKS):
        parser.error("arguments --task_*: every task is off; enable at least one of " + ", ".join(TASKS))
    if not [d for d in args.answer_dsets.split(",") if d]:
        parser.error("argument --answer_dsets: expected at least one dataset name, got ''")
    if args.valid and not args.train:
        parser.error("argument --valid: given without --train (the synthetic set brings its own)")


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


def single_process_env() -> None:
    """Let ``python train.py`` run without the launcher (DeepSpeed otherwise looks for MPI)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def ds_config(args: argparse.Namespace, cuda: bool, world: int = 1) -> dict:
    """The DeepSpeed config: ds.json (or --deepspeed_config) with the flags applied.

    ``train_batch_size`` (DeepSpeed: micro batch x accumulation x world size) is honoured: without an
    accumulation in the file or --grad_accum it sets the accumulation (it must divide by micro batch x
    world size); with one it must agree. Either way the run's batch is what the file says, or an error."""
    path = args.deepspeed_config or os.path.join(REPO, "ds.json")
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


def prepare_data(args: argparse.Namespace, rank: int):
    """Resolve (and on rank 0 generate / convert) the data; returns paths after a barrier.
    Fills in the data-dependent defaults ``args.num_boxes`` and ``args.max_seq_len``."""
    import torch.distributed as dist

    from lxmert_fast.data import is_store, synthetic

    data_dir = args.data_dir
    use_synthetic = args.train is None
    if use_synthetic:
        train = [os.path.join(data_dir, "train.json")]
        valid = [os.path.join(data_dir, "valid.json")]
        features = [os.path.join(data_dir, synthetic.feature_file(split)) for split in synthetic.SPLITS]
    else:
        train = args.train.split(",")
        valid = args.valid.split(",") if args.valid else []
        if not args.features:
            raise SystemExit("--features: required with --train (feature TSV files or store directories)")
        features = args.features.split(",")
    tsvs = [f for f in features if not is_store(f)]
    stores = [f for f in features if is_store(f)]
    store_dir = args.store_dir or os.path.join(data_dir, "feature_store")
    if rank == 0:
        if use_synthetic and not synthetic.is_current(data_dir):
            older = os.path.isfile(os.path.join(data_dir, "meta.json"))
            if older and is_store(store_dir):
                # Converted from a set of an older generator (other files, other box count):
                # it must be rebuilt, or training would mix the two formats.
                if args.store_dir is not None:
                    raise SystemExit(
                        f"--store_dir {store_dir}: converted from an older synthetic set in {data_dir}; "
                        "remove it or name another directory, so it can be rebuilt from the new set"
                    )
                shutil.rmtree(store_dir)
            if older:
                print(f"regenerating the synthetic dataset in {data_dir} (older format)", flush=True)
            else:
                print(f"generating the synthetic dataset in {data_dir}", flush=True)
            synthetic.generate(
                data_dir, num_train=args.synthetic_images, num_valid=max(20, args.synthetic_images // 10)
            )
        if tsvs:
            ensure_store(tsvs, store_dir, args.fp16_features, explicit=args.store_dir is not None)
    dist.barrier()
    if tsvs:
        stores.append(store_dir)
    if len(stores) != 1:
        raise SystemExit(f"--features: expected TSVs and/or exactly one store directory, got stores {stores}")
    vocab = args.vocab or os.path.join(data_dir, "vocab.txt")
    answers = args.answer_table or os.path.join(data_dir, "all_ans.json")
    object_words = args.object_words or os.path.join(data_dir, "object_words.txt")
    if args.num_boxes is None:
        args.num_boxes = synthetic.NUM_BOXES if use_synthetic else 36
    if args.max_seq_len is None:
        args.max_seq_len = synthetic.MAX_SEQ_LEN if use_synthetic else 20
    return train, valid, stores[0], vocab, answers, object_words if os.path.isfile(object_words) else None


def ensure_store(tsvs: list[str], store_dir: str, fp16: bool, explicit: bool) -> None:
    """Convert ``tsvs`` into ``store_dir`` unless it already is their conversion (same files, sizes,
    times, dtype, as the store records). A store of other files is rebuilt when it is the default
    ``DATA_DIR/feature_store`` and refused when named by --store_dir: never used in their place."""
    from lxmert_fast.data import convert_tsv_to_store, is_store
    from lxmert_fast.data.store import store_mismatch

    if is_store(store_dir):
        why = store_mismatch(store_dir, tsvs, fp16=fp16)
        if why is None:
            return
        if explicit:
            raise SystemExit(
                f"--store_dir {store_dir}: not a conversion of --features as given ({why}); remove it, "
                "name another --store_dir, or pass the store directory itself in --features"
            )
        print(f"re-converting the feature store: {why}", flush=True)
    print(f"converting {len(tsvs)} feature TSV file(s) to {store_dir} (once)", flush=True)
    convert_tsv_to_store(tsvs, store_dir, fp16=fp16)


def total_steps_of(args: argparse.Namespace, per_epoch: int, cuda: bool) -> int:
    """Optimizer steps of the run: --max_steps, else --epochs x steps per epoch; the synthetic set
    on the CPU defaults to 1000 steps when neither is given (its epochs are a few steps)."""
    if args.max_steps is not None:
        return args.max_steps
    if args.epochs is None and not cuda and args.train is None:
        return 1000
    epochs = 20.0 if args.epochs is None else args.epochs
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
RESUME_FIXED = {
    "preset": "--preset",
    "world": "the world size (processes)",
    "micro_batch": "--micro_batch",
    "grad_accum": "--grad_accum",
    "zero_stage": "--zero_stage",
    "precision": "--precision",
    "optimizer": "--optimizer",
    "weight_decay": "--weight_decay",
    "adam_eps": "--adam_eps",
    "seed": "--seed",
    "max_seq_len": "--max_seq_len",
    "num_boxes": "--num_boxes",
    "tasks": "--task_*",
    "visual_losses": "--visual_losses",
    "train": "--train / --data_dir",
    "features": "--features / --store_dir",
}
RESUME_CHANGEABLE = {
    "lr": ("--lr", "the new peak learning rate applies from this step (same warmup and decay shape)"),
    "total_steps": (
        "--max_steps / --epochs",
        "the warmup and decay schedule is recomputed for the new length",
    ),
    "warmup_ratio": ("--warmup_ratio", "the schedule is recomputed with the new warmup"),
    "weights": ("--weight_*", "the new loss weights apply from this step"),
    "qa_schedule": ("--qa_schedule", "applies from this step"),
    "obj_loss_on": ("--obj_loss_on", "applies from this step"),
    "word_mask_rate": ("--word_mask_rate", "new masking from this step"),
    "obj_mask_rate": ("--obj_mask_rate", "new masking and visual-loss scale from this step"),
    "mismatch_rate": ("--mismatch_rate", "new mismatched pairs from this step"),
}


def resume_changes(recorded: dict | None, current: dict, checkpoint: str) -> tuple[str | None, list[str]]:
    """Compare the flags ``checkpoint`` was trained with (``recorded``) with this run's.
    Returns (an error naming every flag that cannot change, or None; notes on allowed changes)."""
    if not recorded:
        return None, [
            f"--resume: {checkpoint} records no flags (saved by an older version): changes not checked"
        ]
    fixed = [
        f"{name} {recorded.get(key)!r} (now {current.get(key)!r})"
        for key, name in RESUME_FIXED.items()
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
        for key, (name, effect) in RESUME_CHANGEABLE.items()
        if key in recorded and recorded[key] != current.get(key)
    ]
    return error, notes


def answer_entries(path: str, kept: list[str]) -> list[dict]:
    """The entries of the answer table at ``path`` whose answers are ``kept``, in ``kept``'s order
    (the answer head's label order): the table the exported model's QA head was sized for."""
    with open(path, encoding="utf-8") as f:
        by_answer = {e["ans"]: e for e in json.load(f)}
    return [by_answer[a] for a in kept]


def metrics_flops(model_config, inputs: dict, task_weights: dict[str, float]) -> int:
    """FLOPs of one training micro-step (forward, weighted losses, backward) at ``inputs``' shapes."""
    import lxmert_fast
    from lxmert_fast import pretraining as pt
    from lxmert_fast.metrics import training_flops

    return training_flops(
        lambda: lxmert_fast.LxmertForPreTraining(model_config),
        inputs,
        lambda out: pt.weighted_loss(out.losses, task_weights),
    )


def main() -> None:
    args = parse_args()
    use_tb, tb_note = tensorboard_choice(args.tensorboard, tensorboard_installed())
    single_process_env()
    import deepspeed
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    import lxmert_fast
    from lxmert_fast import atomic, rundir
    from lxmert_fast import pretraining as pt
    from lxmert_fast.data import (
        AnswerTable,
        EpochBatchSampler,
        FeatureStore,
        PretrainDataset,
        WordPieceTokenizer,
        build_examples,
        load_pretrain_json,
    )
    from lxmert_fast.metrics import RunningMetrics, accuracies, bf16_peak_flops

    cuda = torch.cuda.is_available()
    if not cuda and not args.shm_comm:
        # DeepSpeed JIT-compiles its shared-memory allreduce op for the CPU (minutes on a small
        # machine, and again whenever its build cache is invalidated); gloo serves without it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(args.local_rank)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        threads = args.cpu_threads
        torch.set_num_threads(
            threads if threads is not None else max(1, (os.cpu_count() or 1) // local_world - 1)
        )
    # Before anything is written: lock OUTPUT, refuse another run's state, pick the checkpoint.
    run = rundir.open_run(args.output_dir, resume=args.resume, overwrite=args.overwrite)
    preset = args.preset or ("paper" if cuda else "small")
    lr = args.lr if args.lr is not None else (1e-4 if preset == "paper" else 1e-3)
    config = ds_config(args, cuda, world)
    micro, accum = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]

    train_json, valid_json, store_dir, vocab, answers_path, object_words = prepare_data(args, rank)
    store = FeatureStore(store_dir)
    tokenizer = WordPieceTokenizer(vocab)
    answers = AnswerTable.load(answers_path, dsets=args.answer_dsets.split(","))
    train_ex = build_examples(load_pretrain_json(train_json), answers, image_ids=store.keys())
    valid_ex = (
        build_examples(load_pretrain_json(valid_json), answers, image_ids=store.keys()) if valid_json else []
    )
    probe = None
    if object_words:
        with open(object_words) as f:
            probe = {tokenizer.vocab[w] for w in (line.strip() for line in f) if w in tokenizer.vocab}
    dataset = functools.partial(
        PretrainDataset,
        store=store,
        tokenizer=tokenizer,
        max_seq_len=args.max_seq_len,
        num_boxes=args.num_boxes,
    )
    corruption = dict(word_mask_rate=args.word_mask_rate, mismatch_rate=args.mismatch_rate)
    train_set = dataset(train_ex, seed=args.seed, **corruption)
    # Held-out sets: the training corruption with its own seed, and the object-word probe.
    eval_sets = []
    if valid_ex:
        eval_sets.append(("", dataset(valid_ex, seed=args.seed + 1, **corruption)))
    if valid_ex and probe:
        clean = dict(word_mask_rate=0.0, mismatch_rate=0.0, mask_object_words=probe)
        eval_sets.append(("object_word_", dataset(valid_ex, seed=args.seed + 1, **clean)))
    sampler = EpochBatchSampler(len(train_set), micro, rank, world, seed=args.seed)
    per_epoch = len(sampler) // accum
    total_steps = total_steps_of(args, per_epoch, cuda)
    workers = args.num_workers if args.num_workers is not None else (4 if cuda else 0)
    precision = "bf16" if config["bf16"]["enabled"] else "fp16" if config["fp16"]["enabled"] else "fp32"
    # Saved with every checkpoint (client_state and run.json, key "args") and compared on --resume.
    run.args = {
        "preset": preset,
        "world": world,
        "micro_batch": micro,
        "grad_accum": accum,
        "zero_stage": config.get("zero_optimization", {}).get("stage", 0),
        "precision": precision,
        "optimizer": args.optimizer,
        "weight_decay": args.weight_decay,
        "adam_eps": args.adam_eps,
        "seed": args.seed,
        "max_seq_len": args.max_seq_len,
        "num_boxes": args.num_boxes,
        "tasks": [t for t in TASKS if getattr(args, f"task_{t}")],
        "visual_losses": sorted(v for v in args.visual_losses.split(",") if v),
        "train": [os.path.abspath(f) for f in train_json],
        "features": os.path.abspath(store_dir),
        "lr": lr,
        "total_steps": total_steps,
        "warmup_ratio": args.warmup_ratio,
        "weights": {k: getattr(args, f"weight_{k}") for k in pt.TASK_LOSSES},
        "qa_schedule": args.qa_schedule,
        "obj_loss_on": args.obj_loss_on,
        "word_mask_rate": args.word_mask_rate,
        "obj_mask_rate": args.obj_mask_rate,
        "mismatch_rate": args.mismatch_rate,
    }
    if run.resume_tag is not None:
        outcome: list = [None]
        if rank == 0:
            marker = rundir.read_marker(os.path.join(run.ckpt_dir, run.resume_tag)) or {}
            outcome = [resume_changes(marker.get("args"), run.args, run.resume_tag)]
        if world > 1:
            dist.broadcast_object_list(outcome, src=0)
        error, notes = outcome[0]
        if error:
            raise SystemExit(error)
        if rank == 0:
            for note in notes:
                print(note, flush=True)

    tasks = {t: getattr(args, f"task_{t}") for t in TASKS}
    model_config = pt.build_config(
        preset,
        len(tokenizer),
        store.feature_dim,
        len(answers),
        tasks,
        [v for v in args.visual_losses.split(",") if v],
        obj_mask_rate=args.obj_mask_rate,
    )
    torch.manual_seed(args.seed)
    model = lxmert_fast.LxmertForPreTraining(model_config)
    model.lxmert.check_inputs = False
    n_params = model.num_parameters()
    groups = pt.parameter_groups(model, args.weight_decay)
    optimizer = pt.build_optimizer(
        args.optimizer,
        groups,
        lr,
        args.adam_eps,
        torch.device("cuda" if cuda else "cpu"),
        fused=args.fused_optimizer,
    )
    warmup = max(1, int(args.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, pt.linear_warmup_decay(total_steps, warmup))
    zero3 = config.get("zero_optimization", {}).get("stage", 0) == 3
    if zero3:
        # These modules read their children's weights directly instead of calling them.
        deepspeed.utils.set_z3_leaf_modules(model, list(lxmert_fast.layers.ZERO3_LEAF_MODULES))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    visual_logits = pt.VisualLogits(engine.module)
    weights = {k: getattr(args, f"weight_{k}") for k in pt.TASK_LOSSES}
    capture = cuda if args.capture is None else args.capture
    if capture:
        # CUDA graphs (mode reduce-overhead) remove the per-kernel launch cost that dominates the
        # eager step (DESIGN.md §7); the gradient reduction and the optimizer step stay outside.
        engine.compile(
            backend=args.compile_backend, compile_kwargs={"mode": "reduce-overhead"} if cuda else {}
        )

    micro_step = 0
    if run.resume_tag is not None:
        path, client = engine.load_checkpoint(run.ckpt_dir, tag=run.resume_tag)
        if path is None:
            raise SystemExit(
                f"--resume: DeepSpeed could not load {os.path.join(run.ckpt_dir, run.resume_tag)}"
            )
        micro_step = client["micro_step"]
        # The checkpoint restored the scheduler's base learning rates: this run's --lr and schedule
        # (recomputed for total_steps) apply from here, as resume_changes announced.
        scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
        resumed = [
            base * f(scheduler.last_epoch)
            for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        for group, value in zip(optimizer.param_groups, resumed, strict=True):
            group["lr"] = value
        scheduler._last_lr = resumed
    step = micro_step // accum
    log = open(os.path.join(args.output_dir, "log.jsonl"), "a") if rank == 0 else None  # noqa: SIM115
    tb = None
    if rank == 0:
        if use_tb:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
        print(
            f"preset {preset}: {n_params:,} parameters; {len(train_ex)} train / {len(valid_ex)} held-out sentences; "
            f"world {world} x micro {micro} x accum {accum}; {total_steps} steps "
            f"({per_epoch} per epoch); ZeRO {config.get('zero_optimization', {}).get('stage', 0)}; "
            f"{'bf16' if config['bf16']['enabled'] else 'fp16' if config['fp16']['enabled'] else 'fp32'}; "
            f"{'resuming at step ' + str(step) if step else 'from scratch'}; "
            f"{'captured' if capture else 'eager'} step; {tb_note}",
            flush=True,
        )
    peak = bf16_peak_flops(engine.device)
    flops_per_sample = None

    def to_device(batch: dict) -> dict:
        return {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}

    def check_batch(batch: dict, examples: list) -> None:
        """The model's value checks (ids, boxes, class ids), run here on the CPU batch: the model's
        own are off (model.lxmert.check_inputs) so that the step never waits on the device."""
        try:
            pt.check_batch(engine.module, batch)
        except ValueError as exc:
            images = sorted({examples[i].img_id for i in batch["index"].tolist()})
            raise ValueError(f"{exc} (a batch of images {', '.join(images)})") from exc

    def run_batch(batch: dict, obj_seed: int, obj_offset: int, examples: list):
        check_batch(batch, examples)
        use_vmask = not bool((batch["visual_mask"] > 0).all())
        # Sparse heads: the rows to decode come from the CPU batch, so the step on the device has
        # fixed shapes and no value-dependent control flow.
        positions = pt.head_positions(
            batch, model_config, args.word_mask_rate, obj_seed, obj_offset, args.obj_mask_rate
        )
        batch = to_device({**batch, **positions})
        feats, obj_labels, selected = batch["visual_feats"], None, None
        if model_config.task_obj_predict:
            feats, obj_labels, selected = pt.mask_objects(
                batch, obj_seed, obj_offset, args.obj_mask_rate, args.obj_loss_on
            )
        inputs = pt.model_inputs(batch, feats, obj_labels, use_vmask)
        if zero3 and engine.training:
            # ZeRO-3 re-gathers a module's weights for backward from hooks on tensors that need
            # grad; the visual encoder's inputs are data, so without this its LayerNorm weights
            # are still released (size 0) when its backward runs.
            inputs["visual_feats"] = inputs["visual_feats"].detach().requires_grad_(True)
            inputs["visual_pos"] = inputs["visual_pos"].detach().requires_grad_(True)
        out = engine(**inputs)
        return out, pt.accuracy_counts(out, batch, selected, visual_logits.pop()), inputs

    def evaluate() -> dict:
        if not eval_sets:
            return {}
        engine.eval()
        if args.eval_delay:
            time.sleep(args.eval_delay)
        eval_sampler = EpochBatchSampler(len(valid_ex), micro, rank, world, shuffle=False)
        result = {}
        with torch.no_grad():
            for prefix, eval_set in eval_sets:
                sums, losses, n = {}, {}, 0
                loader = DataLoader(eval_set, batch_sampler=eval_sampler, num_workers=workers)
                for i, batch in enumerate(loader):
                    if args.eval_batches is not None and i >= args.eval_batches:
                        break
                    out, counts, _ = run_batch(
                        batch, args.seed + 2, (i * world + rank) * micro * args.num_boxes, valid_ex
                    )
                    for k, v in counts.items():
                        sums[k] = sums.get(k, 0) + v
                    for k, v in out.losses.items():
                        losses[k] = losses.get(k, 0.0) + float(v)
                    n += 1
                if prefix:
                    sums = {"mlm": sums["mlm"]} if "mlm" in sums else {}
                    losses = {}
                keys = sorted(sums)
                if keys:
                    stacked = torch.stack([sums[k] for k in keys])
                    dist.all_reduce(stacked)
                    totals = dict(zip(keys, stacked, strict=True))
                    result.update({f"{prefix}{k}_acc": v for k, v in accuracies(totals).items()})
                result.update({f"{k}_loss": round(v / max(n, 1), 5) for k, v in losses.items()})
        engine.train()
        return result

    def write(record: dict) -> None:
        if log is not None:
            with atomic.reporting_disk_full(log.name):
                log.write(json.dumps(record) + "\n")
                log.flush()
            if tb is not None:
                for k, v in record.items():
                    if isinstance(v, int | float) and k != "step":
                        tb.add_scalar(f"{record.get('split', 'train')}/{k}", v, record["step"])

    def stop_if_nonfinite(first: dict[str, int] | None = None) -> None:
        """Stop every rank, naming the optimizer step and the loss terms, if a loss term was NaN or
        Inf since the last logged step. The flags live on the device (RunningMetrics); they are read
        here (``first``: as read with the logged values), before each save and before the export,
        never per step."""
        first = metrics.first_nonfinite() if first is None else first
        if not first:
            return
        keys = sorted(first)
        never = 2**62
        steps = torch.tensor([first[k] if first[k] >= 0 else never for k in keys], device=engine.device)
        if world > 1:
            dist.all_reduce(steps, op=dist.ReduceOp.MIN)
        bad = {k: int(v) for k, v in zip(keys, steps.tolist(), strict=True) if v < never}
        if not bad:
            return
        at = min(bad.values())
        terms = [k for k, v in bad.items() if v == at and k != "loss"] or ["loss"]
        raise SystemExit(
            f"step {at // accum + 1} (micro-step {at}): the {', '.join(terms)} loss is NaN or Inf; training "
            "stopped, nothing saved after it. Lower --lr, check the data, or resume from the last checkpoint"
        )

    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="pretrain", dynamic_ncols=True, file=sys.stdout)
    start, window_start, window_samples = time.time(), time.time(), 0
    metrics = RunningMetrics()
    engine.train()
    while step < total_steps:
        epoch, skip = divmod(micro_step, len(sampler))
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch, skip)
        loader = DataLoader(train_set, batch_sampler=sampler, num_workers=workers, pin_memory=cuda)
        for batch in loader:
            # Dropout and object masking depend only on (seed, rank, micro-step): exact resume.
            torch.manual_seed((args.seed * 1_000_003 + micro_step) * 4099 + rank)
            qa_w = pt.qa_weight(args.qa_schedule, step, total_steps)
            task_weights = {**weights, "qa": weights["qa"] * qa_w}
            out, counts, inputs = run_batch(
                batch, args.seed, (micro_step * world + rank) * micro * args.num_boxes, train_ex
            )
            loss = pt.weighted_loss(out.losses, task_weights)
            engine.backward(loss)
            engine.step()
            if flops_per_sample is None:
                # Counted once, on the meta device, with this step's shapes: the numerator of TFLOP/s.
                flops_per_sample = metrics_flops(model_config, inputs, task_weights) / micro
            micro_step += 1
            window_samples += micro * world
            # Summed on the device: the host reads them once per logging window, not every step.
            # step: this micro-step's index (micro_step already counts it).
            metrics.add_losses({**out.losses, "loss": loss}, weight=1.0 / accum, step=micro_step - 1)
            metrics.add_counts(counts)
            if micro_step % accum:
                continue
            step += 1
            if step % args.log_every == 0 or step == total_steps:
                rate = window_samples / max(time.time() - window_start, 1e-9)
                tflops = rate * flops_per_sample / 1e12
                nonfinite = metrics.first_nonfinite()
                values = metrics.read()
                record = {
                    "step": step,
                    "epoch": round(micro_step / len(sampler), 4),
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": round(rate, 2),
                    "tflops": round(tflops, 3),
                    **({"peak_pct": round(100 * tflops * 1e12 / (peak * world), 2)} if peak else {}),
                    **values,
                }
                fallbacks = lxmert_fast.backend.fallback_counts()
                if fallbacks:
                    # Ops that ran the PyTorch reference on the GPU (calls, or traces when captured).
                    record["fallbacks"] = fallbacks
                    lxmert_fast.backend.reset_fallback_counts()
                write(record)
                stop_if_nonfinite(nonfinite)
                window_start, window_samples = time.time(), 0
                if bar is not None:
                    postfix = dict(
                        loss=f"{values['loss']:.3f}", samples_s=f"{rate:.1f}", tflops=f"{tflops:.2f}"
                    )
                    if peak:
                        postfix["peak"] = f"{record['peak_pct']:.1f}%"
                    bar.set_postfix(**postfix)
            if bar is not None:
                bar.update(1)
            if args.eval_every and (step % args.eval_every == 0 or step == total_steps):
                eval_start = time.time()
                write({"step": step, "split": "valid", **evaluate()})
                window_start += time.time() - eval_start  # samples/s counts training time only
            if args.save_every and (step % args.save_every == 0 or step == total_steps):
                stop_if_nonfinite()
                run.save_checkpoint(engine, step, micro_step, args.keep_checkpoints)
                if args.kill_after_step == step:
                    if log is not None:
                        log.close()
                    os.kill(os.getpid(), signal.SIGKILL)
            if step >= total_steps:
                break
    if bar is not None:
        bar.close()
    stop_if_nonfinite()

    if not args.no_export:
        export = run.export_dir
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(
            params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")
        ):
            if rank == 0:
                state = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
                fresh = lxmert_fast.LxmertForPreTraining(model_config)
                fresh.load_state_dict(state)
                # Written aside and swapped in whole: the previous export survives any fault.
                with atomic.publishing_dir(export) as tmp:
                    fresh.save_pretrained(tmp)
                    shutil.copy(vocab, os.path.join(tmp, "vocab.txt"))
                    # The table the QA head was sized for (--answer_dsets applied), not the file as given.
                    with open(os.path.join(tmp, "all_ans.json"), "w", encoding="utf-8") as f:
                        json.dump(answer_entries(answers_path, answers.answers), f, indent=0)
        dist.barrier()
    if rank == 0:
        print(
            f"done: {step} steps in {time.time() - start:.1f} s; log {args.output_dir}/log.jsonl"
            + ("" if args.no_export else f"; export {args.output_dir}/export"),
            flush=True,
        )
        if log is not None:
            log.close()
        if tb is not None:
            tb.close()
    dist.barrier()
    run.close()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
