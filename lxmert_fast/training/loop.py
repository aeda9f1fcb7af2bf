"""One training loop for every job: engine, schedule, capture, logging, evaluation, checkpoints,
exact resume and export under DeepSpeed.

A :class:`Job` supplies what differs — its data, its model, one step's loss and accuracy counts,
its held-out evaluation and what its export holds — and :func:`run` does the rest:

* the process group (with ``--dist_timeout``), CPU threads per process from the launcher's
  per-node count, the output directory (lock, refusal of another run's state, the checkpoint to
  resume, agreed by every rank), the storage layout (one shared filesystem or a disk per node);
* DeepSpeed with the optimizer and the linear warmup/decay schedule, ZeRO 0–3, and on CUDA the
  captured step (``torch.compile`` mode ``reduce-overhead``: CUDA graphs);
* the step loop: every random draw of step ``m`` on rank ``r`` depends only on (seed, r, m), so a
  resumed run continues exactly; losses and accuracy counts are summed on the device and read
  once per ``--log_every`` window, averaged over all ranks; a NaN or Inf loss stops every rank,
  naming the step and the term (exit status 1);
* checkpoints every ``--save_every`` steps, published atomically by the rank(s) that own a disk
  (:mod:`lxmert_fast.rundir`), and the export in Hugging Face format, replaced as a whole.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lxmert_fast.training import dist as rdist
from lxmert_fast.training import flags


@dataclass
class StepResult:
    """One micro-step's outputs: the loss to backpropagate, its named terms (logged), ``(correct,
    total)`` count pairs (device tensors), and the model inputs (for the FLOP count)."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    inputs: dict[str, Any]


class Job:
    """What a training job supplies to :func:`run`. Attributes set by the loop before
    :meth:`setup`: ``args``, ``cuda``, ``device``, ``rank``, ``world``, ``micro`` (micro batch per
    rank), ``layout`` (:class:`lxmert_fast.training.dist.Layout`)."""

    name: str = "train"
    # Flags (run.args keys -> flag names) that cannot / can change on --resume, beyond the loop's.
    resume_fixed: ClassVar[Mapping[str, str]] = {}
    resume_changeable: ClassVar[Mapping[str, tuple[str, str]]] = {}
    # Module classes ZeRO-3 must gather as a whole (they read children's weights directly).
    zero3_leaf_modules: tuple[type, ...] = ()

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def data_dirs(self) -> list[str]:
        """The directories :meth:`prepare_data` writes (shared by all nodes, or one per node)."""
        return []

    def prepare_data(self) -> None:
        """Generate / convert data; runs on the ranks that own a data disk (``self.layout.data_preparer``),
        the others wait at a barrier."""

    def setup(self) -> None:
        """Open the data (after :meth:`prepare_data` on every disk) and build the datasets."""
        raise NotImplementedError

    @property
    def train_size(self) -> int:
        """Examples in an epoch (the sampler's length)."""
        raise NotImplementedError

    def default_lr(self) -> float:
        raise NotImplementedError

    def default_steps(self) -> tuple[float, int | None]:
        """(epochs, steps or None) when neither --epochs nor --max_steps is given."""
        raise NotImplementedError

    def recorded_args(self) -> dict[str, Any]:
        """This job's flags saved with each checkpoint and compared on --resume."""
        return {}

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def describe(self) -> str:
        """The start-up line's words on the model and data."""
        return ""

    def train_loader(self, sampler: Any, workers: int, pin_memory: bool) -> Iterable:
        raise NotImplementedError

    def train_step(self, engine: Any, batch: Any, micro_step: int, step: int, total_steps: int) -> StepResult:
        raise NotImplementedError

    def flops(self, inputs: dict[str, Any]) -> int | None:
        """FLOPs of one training micro-step at ``inputs``' shapes (None: not counted)."""
        return None

    def evaluate(self, engine: Any, workers: int) -> dict[str, Any]:
        """Held-out metrics, the same on every rank (reduced over ranks); {} without a held-out set."""
        return {}

    def export(self, state: dict[str, torch.Tensor], directory: str) -> None:
        """Write the export (rank 0) from the full fp32 ``state`` dict into the empty ``directory``."""
        raise NotImplementedError


def zero3_inputs(inputs: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """ZeRO-3 re-gathers a module's weights for backward from hooks on tensors that need grad; data
    inputs do not, so without this the first module fed by ``names`` has its weights released
    (size 0) when its backward runs."""
    for name in names:
        inputs[name] = inputs[name].detach().requires_grad_(True)
    return inputs


def set_up(job: Job, cuda: bool, rank: int, world: int, micro: int, layout: rdist.Layout) -> None:
    """Give ``job`` its place in the job, prepare the data on the ranks that own a data disk (the
    others wait at a barrier, within --dist_timeout) and let every rank open it (``job.setup``)."""
    import torch.distributed as dist

    job.cuda, job.rank, job.world, job.micro, job.layout = cuda, rank, world, micro, layout
    job.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if layout.data_preparer:
        job.prepare_data()
    dist.barrier()
    job.setup()


def run(job: Job, args: argparse.Namespace, default_config: str) -> None:
    """Train ``job`` as ``args`` say; ``default_config`` is the DeepSpeed JSON without
    --deepspeed_config. Ends the process (``os._exit``) once everything is written."""
    use_tb, tb_note = flags.tensorboard_choice(args.tensorboard, flags.tensorboard_installed())
    cuda, rank, world, local_world = rdist.start_processes(args)
    import deepspeed
    import torch.distributed as dist

    import lxmert_fast
    from lxmert_fast import atomic, rundir
    from lxmert_fast import pretraining as pt
    from lxmert_fast.metrics import RunningMetrics, bf16_peak_flops

    layout = rdist.detect_layout(args.storage, args.output_dir, job.data_dirs())
    # Before anything is written: lock OUTPUT, refuse another run's state, pick the checkpoint.
    run_dir = rundir.open_run(args.output_dir, resume=args.resume, overwrite=args.overwrite, layout=layout)
    config = flags.ds_config(args, cuda, world, default_config)
    if not layout.output_shared:
        # Every node writes its own model-state files, not only global rank 0's node.
        config.setdefault("checkpoint", {})["use_node_local_storage"] = True
    micro, accum = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    set_up(job, cuda, rank, world, micro, layout)
    from lxmert_fast.data import EpochBatchSampler

    sampler = EpochBatchSampler(job.train_size, micro, rank, world, seed=args.seed)
    per_epoch = len(sampler) // accum
    epochs, steps = job.default_steps()
    total_steps = flags.total_steps_of(args, per_epoch, epochs, steps)
    lr = args.lr if args.lr is not None else job.default_lr()
    workers = args.num_workers if args.num_workers is not None else (4 if cuda else 0)
    precision = "bf16" if config["bf16"]["enabled"] else "fp16" if config["fp16"]["enabled"] else "fp32"
    zero_stage = config.get("zero_optimization", {}).get("stage", 0)
    # Saved with every checkpoint (client_state and run.json, key "args") and compared on --resume.
    run_dir.args = {
        "world": world,
        "micro_batch": micro,
        "grad_accum": accum,
        "zero_stage": zero_stage,
        "precision": precision,
        "optimizer": args.optimizer,
        "weight_decay": args.weight_decay,
        "adam_eps": args.adam_eps,
        "seed": args.seed,
        "lr": lr,
        "total_steps": total_steps,
        "warmup_ratio": args.warmup_ratio,
        **job.recorded_args(),
    }
    if run_dir.resume_tag is not None:
        outcome: list = [None]
        if rank == 0:
            marker = rundir.read_marker(os.path.join(run_dir.ckpt_dir, run_dir.resume_tag)) or {}
            outcome = [
                flags.resume_changes(
                    marker.get("args"),
                    run_dir.args,
                    run_dir.resume_tag,
                    {**flags.RESUME_FIXED, **job.resume_fixed},
                    {**flags.RESUME_CHANGEABLE, **job.resume_changeable},
                )
            ]
        if world > 1:
            dist.broadcast_object_list(outcome, src=0)
        error, notes = outcome[0]
        if error:
            raise SystemExit(error)
        if rank == 0:
            for note in notes:
                print(note, flush=True)

    torch.manual_seed(args.seed)
    model = job.build_model()
    n_params = sum(p.numel() for p in model.parameters())
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
    if zero_stage == 3 and job.zero3_leaf_modules:
        deepspeed.utils.set_z3_leaf_modules(model, list(job.zero3_leaf_modules))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    capture = cuda if args.capture is None else args.capture
    if capture:
        # CUDA graphs (mode reduce-overhead) remove the per-kernel launch cost that dominates the
        # eager step (DESIGN.md §7); the gradient reduction and the optimizer step stay outside.
        engine.compile(
            backend=args.compile_backend, compile_kwargs={"mode": "reduce-overhead"} if cuda else {}
        )

    micro_step = 0
    if run_dir.resume_tag is not None:
        path, client = engine.load_checkpoint(run_dir.ckpt_dir, tag=run_dir.resume_tag)
        micro_step = client["micro_step"] if path is not None and client else -1
        rundir.agree_on_resume(run_dir, micro_step, world)
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
    own_log = os.path.join(args.output_dir, f"log.rank{rank}.jsonl") if args.per_rank_log else None
    if own_log is not None:
        # As log.jsonl (rundir.open_run): the records after the resumed step are recomputed.
        rundir.trim_log(own_log, step)
    log = open(os.path.join(args.output_dir, rundir.LOG_NAME), "a") if rank == 0 else None  # noqa: SIM115
    tb = None
    if rank == 0:
        if use_tb:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
        print(
            f"{job.describe()}{n_params:,} parameters; world {world} ({local_world} per node) x micro {micro} "
            f"x accum {accum}; {total_steps} steps ({per_epoch} per epoch); ZeRO {zero_stage}; {precision}; "
            f"{'resuming at step ' + str(step) if step else 'from scratch'}; "
            f"{'captured' if capture else 'eager'} step; "
            f"{'shared' if layout.output_shared else 'node-local'} output, "
            f"{'shared' if layout.data_shared else 'node-local'} data; {tb_note}",
            flush=True,
        )
    peak = bf16_peak_flops(engine.device)
    flops_per_sample = None

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
        if not first:  # the same loss terms on every rank: all return here, or none
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

        bar = tqdm(total=total_steps, initial=step, desc=job.name, dynamic_ncols=True, file=sys.stdout)
    start, window_start, window_samples = time.time(), time.time(), 0
    metrics = RunningMetrics()
    engine.train()
    while step < total_steps:
        epoch, skip = divmod(micro_step, len(sampler))
        sampler.set_epoch(epoch, skip)
        for batch in job.train_loader(sampler, workers, pin_memory=cuda):
            # Dropout and object masking depend only on (seed, rank, micro-step): exact resume.
            torch.manual_seed((args.seed * 1_000_003 + micro_step) * 4099 + rank)
            result = job.train_step(engine, batch, micro_step, step, total_steps)
            engine.backward(result.loss)
            engine.step()
            if flops_per_sample is None:
                # Counted once, on the meta device, with this step's shapes: the numerator of TFLOP/s.
                flops_per_sample = (job.flops(result.inputs) or 0) / micro
            micro_step += 1
            window_samples += micro * world
            # Summed on the device: the host reads them once per logging window, not every step.
            # step: this micro-step's index (micro_step already counts it).
            metrics.add_losses(
                {**result.losses, "loss": result.loss}, weight=1.0 / accum, step=micro_step - 1
            )
            metrics.add_counts(result.counts)
            if micro_step % accum:
                continue
            step += 1
            if step % args.log_every == 0 or step == total_steps:
                rate = window_samples / max(time.time() - window_start, 1e-9)
                tflops = rate * flops_per_sample / 1e12
                nonfinite = metrics.first_nonfinite()
                own: dict[str, float] | None = {} if own_log else None
                values = metrics.read(all_ranks=world > 1, own=own)
                if own_log is not None:
                    # This rank's own window, beside the global one (on request: --per_rank_log).
                    with atomic.reporting_disk_full(own_log), open(own_log, "a") as f:
                        f.write(json.dumps({"step": step, "rank": rank, **own}) + "\n")
                record = {
                    "step": step,
                    "epoch": round(micro_step / len(sampler), 4),
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": round(rate, 2),
                    **({"tflops": round(tflops, 3)} if flops_per_sample else {}),
                    **(
                        {"peak_pct": round(100 * tflops * 1e12 / (peak * world), 2)}
                        if peak and flops_per_sample
                        else {}
                    ),
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
                    postfix = dict(loss=f"{values['loss']:.3f}", samples_s=f"{rate:.1f}")
                    if flops_per_sample:
                        postfix["tflops"] = f"{tflops:.2f}"
                    if "peak_pct" in record:
                        postfix["peak"] = f"{record['peak_pct']:.1f}%"
                    bar.set_postfix(**postfix)
            if bar is not None:
                bar.update(1)
            if args.eval_every and (step % args.eval_every == 0 or step == total_steps):
                eval_start = time.time()
                engine.eval()
                if args.eval_delay:
                    time.sleep(args.eval_delay)
                with torch.no_grad():
                    held_out = job.evaluate(engine, workers)
                engine.train()
                if held_out:
                    write({"step": step, "split": "valid", **held_out})
                window_start += time.time() - eval_start  # samples/s counts training time only
            if args.save_every and (step % args.save_every == 0 or step == total_steps):
                stop_if_nonfinite()
                run_dir.save_checkpoint(engine, step, micro_step, args.keep_checkpoints)
                if args.kill_after_step == step:
                    if log is not None:
                        log.close()
                    os.kill(os.getpid(), signal.SIGKILL)
            if args.stop_after_step == step:
                os.kill(os.getpid(), signal.SIGSTOP)
            if step >= total_steps:
                break
    if bar is not None:
        bar.close()
    stop_if_nonfinite()

    if not args.no_export:
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(
            params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")
        ):
            if rank == 0:
                state = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
                # Written aside and swapped in whole: the previous export survives any fault.
                with atomic.publishing_dir(run_dir.export_dir) as tmp:
                    job.export(state, tmp)
        dist.barrier()
    if rank == 0:
        print(
            f"done: {step} steps in {time.time() - start:.1f} s; log {args.output_dir}/{rundir.LOG_NAME}"
            + ("" if args.no_export else f"; export {run_dir.export_dir}"),
            flush=True,
        )
        if log is not None:
            log.close()
        if tb is not None:
            tb.close()
    dist.barrier()
    run_dir.close()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
