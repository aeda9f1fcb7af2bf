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
"""

from __future__ import annotations

import argparse
import functools
import json
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
        help="where TSVs are converted to a memory-mapped store (default DATA_DIR/feature_store)",
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
        type=int,
        default=None,
        help="[CLS] + words + [SEP], padded (default 20, the authors'; 12 for the synthetic set)",
    )
    d.add_argument(
        "--num_boxes",
        type=int,
        default=None,
        help="boxes per image (default 36; the synthetic set's own count)",
    )
    d.add_argument(
        "--num_workers", type=int, default=None, help="loader workers (default 0 on CPU, 4 on GPU)"
    )
    d.add_argument("--synthetic_images", type=int, default=1000, help="training images when generating")

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
        t.add_argument(f"--weight_{loss}", type=float, default=1.0)
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
    t.add_argument("--word_mask_rate", type=float, default=0.15)
    t.add_argument("--obj_mask_rate", type=float, default=0.15)
    t.add_argument("--mismatch_rate", type=float, default=0.5, help="probability the sentence is replaced")

    o = p.add_argument_group("optimisation")
    o.add_argument(
        "--optimizer",
        choices=("adamw", "bert_adam"),
        default="adamw",
        help="torch AdamW, or the authors' Adam without bias correction",
    )
    o.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default 1e-4 paper, 1e-3 small/tiny)"
    )
    o.add_argument("--warmup_ratio", type=float, default=0.05)
    o.add_argument("--weight_decay", type=float, default=0.01)
    o.add_argument("--adam_eps", type=float, default=1e-6)
    o.add_argument(
        "--fused_optimizer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fused/multi-tensor optimizer step (default: fused AdamW on CUDA, multi-tensor otherwise); "
        "--no-fused_optimizer: the per-parameter loop",
    )
    o.add_argument("--epochs", type=float, default=20)
    o.add_argument(
        "--max_steps",
        type=int,
        default=None,
        help="optimizer steps (overrides --epochs; 1000 for the synthetic default on CPU)",
    )
    o.add_argument("--micro_batch", type=int, help="override train_micro_batch_size_per_gpu")
    o.add_argument("--grad_accum", type=int, help="override gradient_accumulation_steps")
    o.add_argument("--zero_stage", type=int, choices=(0, 1, 2, 3), help="override zero_optimization.stage")
    o.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto: ds.json's bf16/fp16 if enabled there, else bf16 on GPU and fp32 on CPU",
    )
    o.add_argument("--seed", type=int, default=0)
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
    r.add_argument("--log_every", type=int, default=10)
    r.add_argument("--eval_every", type=int, default=200)
    r.add_argument("--eval_batches", type=int, default=None, help="limit held-out batches per evaluation")
    r.add_argument("--save_every", type=int, default=200)
    r.add_argument("--keep_checkpoints", type=int, default=2)
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
    r.add_argument("--no_progress", action="store_true")
    r.add_argument(
        "--cpu_threads",
        type=int,
        default=None,
        help="torch threads per process on CPU (default: cores / local processes - 1, at least 1; "
        "oversubscribed OpenMP threads spin and run many times slower)",
    )
    r.add_argument(
        "--shm_comm", action="store_true", help="CPU: use DeepSpeed's shared-memory allreduce (JIT-built)"
    )
    r.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    r.add_argument("--kill_after_step", type=int, default=None, help=argparse.SUPPRESS)

    import deepspeed

    p = deepspeed.add_config_arguments(p)
    return p.parse_args(argv)


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


def ds_config(args: argparse.Namespace, cuda: bool) -> dict:
    path = args.deepspeed_config or os.path.join(REPO, "ds.json")
    with open(path) as f:
        config = json.load(f)
    config.setdefault("train_micro_batch_size_per_gpu", 32)
    config.setdefault("gradient_accumulation_steps", 1)
    config.pop("train_batch_size", None)  # derived from micro batch x accumulation x world size
    if args.micro_batch:
        config["train_micro_batch_size_per_gpu"] = args.micro_batch
    if args.grad_accum:
        config["gradient_accumulation_steps"] = args.grad_accum
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

    from lxmert_fast.data import convert_tsv_to_store, is_store, synthetic

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
        if tsvs and not is_store(store_dir):
            print(f"converting {len(tsvs)} feature TSV file(s) to {store_dir} (once)", flush=True)
            convert_tsv_to_store(tsvs, store_dir, fp16=args.fp16_features)
    dist.barrier()
    if tsvs:
        stores.append(store_dir)
    if len(stores) != 1:
        raise SystemExit(f"--features: expected TSVs and/or exactly one store directory, got stores {stores}")
    vocab = args.vocab or os.path.join(data_dir, "vocab.txt")
    answers = args.answer_table or os.path.join(data_dir, "all_ans.json")
    object_words = args.object_words or os.path.join(data_dir, "object_words.txt")
    args.num_boxes = args.num_boxes or (synthetic.NUM_BOXES if use_synthetic else 36)
    args.max_seq_len = args.max_seq_len or (synthetic.MAX_SEQ_LEN if use_synthetic else 20)
    return train, valid, stores[0], vocab, answers, object_words if os.path.isfile(object_words) else None


def jsonable(counts: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: round(float(v[0] / v[1]), 5) for k, v in counts.items() if float(v[1]) > 0}


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
    from lxmert_fast.metrics import RunningMetrics, bf16_peak_flops

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
        torch.set_num_threads(args.cpu_threads or max(1, (os.cpu_count() or 1) // local_world - 1))
    # Before anything is written: lock OUTPUT, refuse another run's state, pick the checkpoint.
    run = rundir.open_run(args.output_dir, resume=args.resume, overwrite=args.overwrite)
    preset = args.preset or ("paper" if cuda else "small")
    lr = args.lr or (1e-4 if preset == "paper" else 1e-3)
    config = ds_config(args, cuda)
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
    total_steps = args.max_steps or (
        1000 if not cuda and args.train is None else int(args.epochs * per_epoch)
    )
    workers = args.num_workers if args.num_workers is not None else (4 if cuda else 0)

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
    step = micro_step // accum
    log = open(os.path.join(args.output_dir, "log.jsonl"), "a") if rank == 0 else None  # noqa: SIM115
    tb = None
    if rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
        except ImportError:
            pass
        print(
            f"preset {preset}: {n_params:,} parameters; {len(train_ex)} train / {len(valid_ex)} held-out sentences; "
            f"world {world} x micro {micro} x accum {accum}; {total_steps} steps "
            f"({per_epoch} per epoch); ZeRO {config.get('zero_optimization', {}).get('stage', 0)}; "
            f"{'bf16' if config['bf16']['enabled'] else 'fp16' if config['fp16']['enabled'] else 'fp32'}; "
            f"{'resuming at step ' + str(step) if step else 'from scratch'}; "
            f"{'captured' if capture else 'eager'} step",
            flush=True,
        )
    peak = bf16_peak_flops(engine.device)
    flops_per_sample = None

    def to_device(batch: dict) -> dict:
        return {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}

    def run_batch(batch: dict, obj_seed: int, obj_offset: int):
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
                        batch, args.seed + 2, (i * world + rank) * micro * args.num_boxes
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
                    result.update(
                        {
                            f"{prefix}{k}_acc": v
                            for k, v in jsonable(dict(zip(keys, stacked, strict=True))).items()
                        }
                    )
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
                batch, args.seed, (micro_step * world + rank) * micro * args.num_boxes
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
            metrics.add_losses({**out.losses, "loss": loss}, weight=1.0 / accum)
            metrics.add_counts(counts)
            if micro_step % accum:
                continue
            step += 1
            if step % args.log_every == 0 or step == total_steps:
                rate = window_samples / max(time.time() - window_start, 1e-9)
                tflops = rate * flops_per_sample / 1e12
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
                run.save_checkpoint(engine, step, micro_step, args.keep_checkpoints)
                if args.kill_after_step == step:
                    if log is not None:
                        log.close()
                    os.kill(os.getpid(), signal.SIGKILL)
            if step >= total_steps:
                break
    if bar is not None:
        bar.close()

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
                    shutil.copy(answers_path, os.path.join(tmp, "all_ans.json"))
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
