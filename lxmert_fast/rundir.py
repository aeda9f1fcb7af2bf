"""The output directory of a training run: its lock, its owner, its checkpoints, and resume.

::

    OUTPUT/train.lock            {"pid", "host", "started", "proc_start"} of the run using it
    OUTPUT/log.jsonl             one JSON record per logged step
    OUTPUT/checkpoints/stepN/    DeepSpeed's files, then run.json {"run_id", "step", "micro_step"}
    OUTPUT/checkpoints/latest    the tag of the newest checkpoint
    OUTPUT/export/               transformers format, replaced as a whole
    OUTPUT/tensorboard/

* One run per directory: rank 0 takes ``train.lock`` (created complete, by a hard link); a
  second run stops naming the holder; the lock of a dead process on this host is taken over,
  saying so.
* A fresh run refuses a directory holding another run's state unless ``--resume`` (continue
  it) or ``--overwrite`` (delete its checkpoints, log, export and tensorboard first).
* A checkpoint is written by DeepSpeed under a temporary tag, completed with ``run.json`` and
  published by one rename (:mod:`lxmert_fast.atomic`); ``latest`` is replaced atomically after
  it. A ``stepN`` directory with a ``run.json`` is therefore complete.
* Every run has a lineage id, kept across resumes; clean-up removes only older checkpoints of
  the current lineage, never the one just written.
* Resume takes the checkpoint ``latest`` names if it is complete, else the newest complete one,
  and says which; records of the log after that step are dropped (they are recomputed).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from lxmert_fast import atomic

LOCK_NAME = "train.lock"
LOG_NAME = "log.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MARKER = "run.json"
# What a run leaves in its output directory (and --overwrite removes).
RUN_STATE = (CHECKPOINTS, LOG_NAME, "export", "tensorboard")
_TAG = re.compile(r"step(\d+)")


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked (in use, or holding another run)."""


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux clock ticks since boot): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _holder(info: dict) -> str:
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


def _lock_is_stale(info: dict) -> bool:
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False  # another host's processes cannot be checked from here
    pid = info["pid"]
    if not atomic.pid_alive(pid):
        return True
    return info.get("proc_start") is not None and _proc_start(pid) != info["proc_start"]


def acquire_lock(output_dir: str) -> tuple[str, str | None]:
    """Take ``OUTPUT/train.lock``; returns its path and a message if a stale lock was taken over.

    Raises :class:`RunDirError` naming the holder when a live run (or one on another host) has it.
    """
    path = os.path.join(output_dir, LOCK_NAME)
    pid = os.getpid()
    mine = {
        "pid": pid,
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "proc_start": _proc_start(pid),
    }
    message = None
    for _ in range(5):
        tmp = atomic.temp_path(path)
        with open(tmp, "w") as f:
            json.dump(mine, f)
        atomic.fsync_file(tmp)
        try:
            os.link(tmp, path)  # fails if a lock exists; never shows a half-written one
            atomic.fsync_dir(output_dir)
            atexit.register(release_lock, path)
            return path, message
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        holder = _read_json(path)
        if holder is None:
            if os.path.exists(path):
                raise RunDirError(f"{path}: unreadable lock file; if no run is using {output_dir}, delete it")
            continue  # released meanwhile
        if not _lock_is_stale(holder):
            raise RunDirError(
                f"{output_dir} is in use by another run: {_holder(holder)} (lock {path}); wait for it "
                f"to finish or choose another --output_dir. If that run is gone, delete {path}."
            )
        # Take the stale lock over: move it aside and check that it is the one judged stale.
        aside = atomic.temp_path(path + ".stale")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        if _read_json(aside) == holder:
            os.unlink(aside)
            message = f"recovered the stale lock {path}: {_holder(holder)}, that process is gone"
        else:
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)  # a live run's lock, taken in between: put it back
            os.unlink(aside)
    raise RunDirError(f"{path}: could not take the lock (other runs keep taking it)")


def release_lock(path: str) -> None:
    """Remove the lock if this process holds it."""
    info = _read_json(path)
    if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def read_marker(tag_dir: str) -> dict | None:
    marker = _read_json(os.path.join(tag_dir, MARKER))
    if marker and isinstance(marker.get("run_id"), str) and isinstance(marker.get("step"), int):
        return marker
    return None


def complete_checkpoints(ckpt_dir: str) -> dict[str, dict]:
    """``{tag: run.json}`` of the complete checkpoints in ``ckpt_dir``, oldest first."""
    found = {}
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(ckpt_dir):
            if _TAG.fullmatch(name) and (marker := read_marker(os.path.join(ckpt_dir, name))):
                found[name] = marker
    return dict(sorted(found.items(), key=lambda kv: kv[1]["step"]))


def read_latest(ckpt_dir: str) -> str | None:
    """The tag ``ckpt_dir/latest`` names ('' if it is empty), None without the file."""
    try:
        with open(os.path.join(ckpt_dir, LATEST)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def choose_checkpoint(ckpt_dir: str) -> tuple[str | None, dict | None, str]:
    """The checkpoint to resume from: the one ``latest`` names if complete, else the newest
    complete one. Returns (tag, its run.json, a message saying which and why)."""
    complete = complete_checkpoints(ckpt_dir)
    latest_path = os.path.join(ckpt_dir, LATEST)
    latest = read_latest(ckpt_dir)
    if latest and latest in complete:
        return latest, complete[latest], f"--resume: continuing from {os.path.join(ckpt_dir, latest)}"
    if latest is None:
        why = f"no {latest_path}"
    elif not latest:
        why = f"{latest_path} is empty"
    elif os.path.isdir(os.path.join(ckpt_dir, latest)):
        why = f"{latest_path} names {latest}, which is incomplete (no {MARKER})"
    else:
        why = f"{latest_path} names {latest}, which does not exist"
    if not complete:
        return None, None, f"--resume: {why} and no complete checkpoint in {ckpt_dir}; starting from step 0"
    tag = next(reversed(complete))
    return tag, complete[tag], f"--resume: {why}; continuing from the newest complete checkpoint {tag}"


def trim_log(path: str, step: int) -> str | None:
    """Drop the records after ``step`` (and any torn line) from the log; returns a message if any."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return None
    atomic.atomic_write_text(path, "".join(line + "\n" for line in kept))
    return f"{path}: dropped {len(lines) - len(kept)} record(s) after step {step} (recomputed now)"


def existing_state(output_dir: str) -> list[str]:
    """What another run left in ``output_dir`` (names from :data:`RUN_STATE`)."""
    found = []
    for name in RUN_STATE:
        path = os.path.join(output_dir, name)
        if (os.path.isdir(path) and os.listdir(path)) or os.path.isfile(path):
            found.append(name)
    return found


@dataclass
class Run:
    """One training run's view of its output directory (the same on every rank)."""

    output_dir: str
    run_id: str
    writer: str  # host-pid of rank 0: the suffix of the temporary checkpoint tags
    resume_tag: str | None = None
    resume_step: int = 0
    lock: str | None = None  # rank 0 only
    messages: list[str] = field(default_factory=list)
    # The flags a checkpoint was trained with (train.py's recorded_args), saved with it under
    # "args" (client_state and run.json): a resume compares them with its own.
    args: dict = field(default_factory=dict)
    # Does this rank publish checkpoints (run.json, the rename, latest, pruning)? Global rank 0 on
    # a shared filesystem; each node's local rank 0 on node-local disks.
    publisher: bool = True

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.output_dir, CHECKPOINTS)

    @property
    def export_dir(self) -> str:
        return os.path.join(self.output_dir, "export")

    def save_checkpoint(self, engine, step: int, micro_step: int, keep: int) -> None:
        """Save ``checkpoints/step{step}`` complete or not at all; every rank calls this. On node-local
        disks every node publishes its own copy (DeepSpeed's ``use_node_local_storage`` writes the
        model states on each node)."""
        tag = f"step{step}"
        tmp = os.path.join(self.ckpt_dir, f".{tag}{atomic.TEMP_MARK}{self.writer}")
        state = {"run_id": self.run_id, "step": step, "micro_step": micro_step, "args": self.args}
        try:
            with atomic.reporting_disk_full(tmp):
                # DeepSpeed ends with a barrier: every rank's files are written when it returns.
                engine.save_checkpoint(
                    self.ckpt_dir, tag=os.path.basename(tmp), client_state=state, save_latest=False
                )
                if self.publisher:
                    atomic.atomic_write_text(os.path.join(tmp, MARKER), json.dumps(state))
                    atomic.publish_dir(tmp, os.path.join(self.ckpt_dir, tag))
                    atomic.atomic_write_text(os.path.join(self.ckpt_dir, LATEST), tag)
                    self.prune(step, keep)
        except Exception:
            if self.publisher:
                shutil.rmtree(tmp, ignore_errors=True)  # gives a full disk its space back
            raise
        _barrier()

    def prune(self, step: int, keep: int) -> None:
        """Keep ``keep`` checkpoints of this lineage up to ``step`` (``keep`` < 1: keep all).
        Checkpoints of other runs, and this lineage's beyond ``step``, are not touched."""
        if keep < 1:
            return
        older = [
            tag
            for tag, marker in complete_checkpoints(self.ckpt_dir).items()
            if marker["run_id"] == self.run_id and marker["step"] < step
        ]
        for tag in older[: max(0, len(older) - (keep - 1))]:
            atomic.remove(os.path.join(self.ckpt_dir, tag))

    def close(self) -> None:
        if self.lock is not None:
            release_lock(self.lock)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _prepare(output_dir: str, resume: bool, overwrite: bool) -> Run:
    """Rank 0's part of :func:`open_run`."""
    if resume and overwrite:
        raise RunDirError("--resume continues the run in --output_dir, --overwrite deletes it: pass one")
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    lock, message = acquire_lock(output_dir)
    try:
        run = Run(output_dir, uuid.uuid4().hex[:12], f"{socket.gethostname()}-{os.getpid()}", lock=lock)
        if message:
            run.messages.append(message)
        # Holding the lock: every temporary here is a leftover of a killed writer.
        atomic.remove_stale_temps(output_dir)
        atomic.remove_stale_temps(run.ckpt_dir)
        if restored := atomic.recover_dir(run.export_dir):
            run.messages.append(restored)
        found = existing_state(output_dir)
        if found and not resume:
            if not overwrite:
                raise RunDirError(
                    f"--output_dir {output_dir} holds another run's {', '.join(found)}: pass --resume to "
                    "continue that run, or --overwrite to delete them and start afresh"
                )
            for name in found:
                atomic.remove(os.path.join(output_dir, name))
            run.messages.append(f"--overwrite: deleted the previous run's {', '.join(found)} in {output_dir}")
        if resume:
            tag, marker, message = choose_checkpoint(run.ckpt_dir)
            run.messages.append(message)
            if tag is not None:
                run.resume_tag, run.resume_step, run.run_id = tag, marker["step"], marker["run_id"]
            if trimmed := trim_log(os.path.join(output_dir, LOG_NAME), run.resume_step):
                run.messages.append(trimmed)
    except BaseException:
        release_lock(lock)
        raise
    return run


def open_run(output_dir: str, resume: bool, overwrite: bool, layout: Any = None) -> Run:
    """Lock and check ``output_dir``, choose the checkpoint to resume from, and hand the result to
    every rank. A refusal stops every rank with the same message.

    ``layout`` (:class:`lxmert_fast.training.dist.Layout`; None: one shared filesystem): on
    node-local disks each node's local rank 0 does this for its own copy of ``output_dir``, and
    the nodes must agree on the checkpoint (:func:`agree_on_checkpoint`)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank = _rank()
    shared = layout is None or layout.output_shared
    preparer = rank == 0 if shared else layout.publisher
    outcome = None
    run = None
    if preparer:
        try:
            run = _prepare(output_dir, resume, overwrite)
            view = {k: v for k, v in vars(run).items() if k != "lock"}
            view["latest"], view["complete"] = _checkpoint_view(run.ckpt_dir) if resume else (None, {})
            outcome = ("ok", view)
        except (RunDirError, OSError) as exc:
            if isinstance(exc, OSError) and (shared or not distributed):
                raise
            outcome = ("error", str(exc))
    every = [outcome]
    if distributed:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, outcome)
    errors = [(r, o[1]) for r, o in enumerate(every) if o is not None and o[0] == "error"]
    if errors:
        if run is not None:
            run.close()
        r, message = errors[0]
        raise SystemExit(
            f"error: {message}" if r == 0 else f"error on rank {r} (its node's {output_dir}): {message}"
        )
    views = {r: o[1] for r, o in enumerate(every) if o is not None}
    chosen = views[0]
    if not shared and resume and len(views) > 1:
        try:
            agreed = agree_on_checkpoint(views)
        except RunDirError as exc:
            if run is not None:
                run.close()
            raise SystemExit(f"error: {exc}") from None
        if rank == 0 and agreed["resume_tag"] != chosen["resume_tag"]:
            print(
                f"--resume: {agreed['resume_tag'] or 'no checkpoint'} is the newest checkpoint complete on "
                f"every node (rank 0's own choice was {chosen['resume_tag']}): continuing from it",
                flush=True,
            )
        chosen = {**chosen, **agreed}
    if run is not None:
        for message in run.messages:
            print(message if rank == 0 else f"rank {rank} ({run.output_dir}): {message}", flush=True)
    # One lineage and one temporary-tag suffix for every rank (DeepSpeed's tag is the same string
    # on all of them), whichever node chose them.
    fields = {k: chosen[k] for k in ("run_id", "writer", "resume_tag", "resume_step")}
    retrim = rank == 0 and run is not None and resume and fields["resume_step"] != run.resume_step
    if retrim and (trimmed := trim_log(os.path.join(run.output_dir, LOG_NAME), fields["resume_step"])):
        print(trimmed, flush=True)
    if run is None:
        run = Run(output_dir=os.path.abspath(output_dir), **fields)
    else:
        for k, v in fields.items():
            setattr(run, k, v)
    run.publisher = preparer
    return run


def _checkpoint_view(ckpt_dir: str) -> tuple[str | None, dict[str, list]]:
    """(the tag ``latest`` names, or None; ``{tag: [run_id, step]}`` of the complete checkpoints)."""
    latest = read_latest(ckpt_dir) or None
    complete = {tag: [m["run_id"], m["step"]] for tag, m in complete_checkpoints(ckpt_dir).items()}
    return latest, complete


def agree_on_checkpoint(views: dict[int, dict]) -> dict:
    """The checkpoint every node resumes from, on node-local disks. ``views``: per publishing rank,
    its node's ``latest``, its complete checkpoints and its own choice.

    Every node must hold a ``latest`` (a node without one lost its checkpoints, or never had them:
    refused, naming it); the nodes resume from the newest checkpoint complete, with one lineage, on
    every node (a crash between two nodes' saves leaves them one checkpoint apart: the older,
    common one is taken and said). Raises :class:`RunDirError` naming each rank's view."""

    def describe(r: int) -> str:
        v = views[r]
        steps = ", ".join(tag for tag in v["complete"]) or "none"
        return f"rank {r}: latest {v['latest'] or 'missing'}, complete checkpoints {steps}"

    summary = "; ".join(describe(r) for r in sorted(views))
    missing = [r for r, v in views.items() if v["latest"] is None]
    if missing and len(missing) < len(views):
        raise RunDirError(
            f"--resume on node-local disks: the nodes of rank(s) {', '.join(map(str, missing))} have no "
            f"checkpoints/latest while others do ({summary}). Resuming would mix steps: restore that node's "
            "checkpoints/ (its ZeRO shards exist only on it; other nodes' copies hold other shards), or start "
            "afresh with --overwrite"
        )
    if missing:
        return {"resume_tag": None, "resume_step": 0}
    common = None
    for v in views.values():
        here = {(tag, run_id, step) for tag, (run_id, step) in v["complete"].items()}
        common = here if common is None else common & here
    if not common:
        raise RunDirError(
            f"--resume on node-local disks: no checkpoint is complete on every node ({summary}); restore "
            "the missing checkpoint files on the node that lacks them, or start afresh with --overwrite"
        )
    tag, run_id, step = max(common, key=lambda c: c[2])
    return {"resume_tag": tag, "resume_step": step, "run_id": run_id}


def agree_on_resume(run: Run, micro_step: int, world: int) -> None:
    """After loading: every rank must hold the same micro-step (``-1``: it could not load). Stops
    every rank naming the ranks and steps otherwise — never a silent mix of steps."""
    import torch.distributed as dist

    steps = [micro_step]
    if world > 1:
        steps = [None] * world
        dist.all_gather_object(steps, micro_step)
    if len(set(steps)) == 1 and steps[0] >= 0:
        return
    where = os.path.join(run.ckpt_dir, run.resume_tag or "")
    views = ", ".join(
        f"rank {r}: {'not loaded' if s < 0 else f'micro-step {s}'}" for r, s in enumerate(steps)
    )
    raise SystemExit(
        f"--resume: the ranks did not load the same state from {where} ({views}); the checkpoint is "
        "incomplete on some node or from another run. Nothing was trained; restore it or start afresh"
    )
