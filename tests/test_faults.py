"""Faults never lose a run's data (issue #13, "Data loss"): atomic writers, lock, lineage, resume.

Faults are injected deterministically through ``LXMERT_FAST_FAULT_AT`` (lxmert_fast/atomic.py):
in-process, a forked child is SIGKILLed at each fault point of a writer in turn and the parent
checks what a reader sees; end to end, train.py (tiny preset, as in test_train.py) is killed at
seeded points of each checkpoint and of the export, then resumed.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lxmert_testing import FAULT, SMALL, killed_at
from test_train import LOSS_KEYS, read_log, run_train

import lxmert_fast
from lxmert_fast import atomic, rundir
from lxmert_fast.data import FeatureStore, convert_tsv_to_store
from lxmert_fast.data.store import store_mismatch


def kill_everywhere(fn, check) -> int:
    """Kill ``fn`` at fault point 1, 2, ... until it completes, calling ``check(n)`` after each
    kill; then run it to the end. Returns the number of kill points."""
    n = 0
    while killed_at(n + 1, fn):
        n += 1
        check(n)
    return n


def no_temps_left(directory: Path) -> None:
    atomic.remove_stale_temps(directory)
    assert not [p.name for p in directory.iterdir() if atomic.TEMP_MARK in p.name]


# ---------------------------------------------------------------- the helpers themselves


def test_atomic_write_keeps_old_or_new_and_reports_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    target.write_text("step1")
    seen = set()

    def check(n):
        seen.add(target.read_text())
        assert target.read_text() in ("step1", "step2"), n

    assert kill_everywhere(lambda: atomic.atomic_write_text(target, "step2"), check) == 2
    assert seen == {"step1"} and target.read_text() == "step2"
    no_temps_left(tmp_path)

    monkeypatch.setenv(FAULT, "enospc:1")
    atomic.reset_fault_count()
    with pytest.raises(atomic.DiskFullError) as info:
        atomic.atomic_write_text(target, "step3")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert "No space left on device" in str(info.value) and str(target) in str(info.value)
    assert target.read_text() == "step2" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_publish_without_exchange_restores_the_old_directory(tmp_path, monkeypatch):
    # File systems without renameat2(RENAME_EXCHANGE): rename aside, rename in; a death in between
    # leaves no directory, and the next writer (or run) puts the old one back.
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "v").write_text("old")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)

    def write():
        with atomic.publishing_dir(tmp_path / "export") as tmp:
            Path(tmp, "v").write_text("new")

    def check(n):
        if not (tmp_path / "export").exists():
            assert "restored the previous complete version" in atomic.recover_dir(tmp_path / "export")
        assert (tmp_path / "export" / "v").read_text() == "old"

    assert kill_everywhere(write, check) == 2
    assert (tmp_path / "export" / "v").read_text() == "new"
    no_temps_left(tmp_path)


# ---------------------------------------------------------------- item 2: the export


def small_model(seed: int):
    torch.manual_seed(seed)
    return lxmert_fast.LxmertForPreTraining(lxmert_fast.LxmertConfig(**SMALL)).eval()


def export(model, path: Path, vocab: str) -> None:
    """What train.py does on rank 0."""
    with atomic.publishing_dir(path) as tmp:
        model.save_pretrained(tmp)
        Path(tmp, "vocab.txt").write_text(vocab)


def read_export(path: Path) -> tuple[dict, str]:
    model = lxmert_fast.LxmertForPreTraining.from_pretrained(path)
    return model.state_dict(), (path / "vocab.txt").read_text()


def same_export(got: tuple[dict, str], want: tuple[dict, str]) -> bool:
    return got[1] == want[1] and all(torch.equal(got[0][k], want[0][k]) for k in want[0])


def test_killed_export_keeps_the_previous_export(tmp_path, monkeypatch):
    old, new = small_model(0), small_model(1)
    out = tmp_path / "export"
    export(old, out, "old")
    want_old = read_export(out)
    export(new, tmp_path / "reference", "new")
    want_new = read_export(tmp_path / "reference")

    def check(n):
        got = read_export(out)  # always a complete export: loads strictly, vocab present
        assert same_export(got, want_old) or same_export(got, want_new), n

    # config.json (half written, not synced), model.safetensors, publish (before, after the swap).
    assert kill_everywhere(lambda: export(new, out, "new"), check) == 5
    assert same_export(read_export(out), want_new)
    no_temps_left(tmp_path)

    monkeypatch.setenv(FAULT, "enospc:3")  # the weights fail to write on a full disk
    atomic.reset_fault_count()
    with pytest.raises(atomic.DiskFullError, match="No space left on device") as info:
        export(old, out, "old")
    assert "model.safetensors" in info.value.filename
    assert same_export(read_export(out), want_new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "reference"]


# ---------------------------------------------------------------- item 3: the feature store


@pytest.fixture(scope="module")
def tsvs(tmp_path_factory) -> list[Path]:
    from lxmert_fast.data.synthetic import feature_file, generate

    path = tmp_path_factory.mktemp("tsv")
    generate(str(path), num_train=5, num_valid=3, feat_dim=8, seed=2)
    return [path / feature_file("train"), path / feature_file("valid")]


def snapshot(store: FeatureStore) -> dict:
    return {k: {f: np.asarray(v).tolist() for f, v in store[k].items()} for k in store.keys()}  # noqa: SIM118 (not a dict)


def test_killed_reconversion_keeps_the_old_store_and_a_torn_store_is_refused(tsvs, tmp_path, monkeypatch):
    out = tmp_path / "store"
    convert_tsv_to_store(tsvs[:1], out)
    want_old = snapshot(FeatureStore(out))
    convert_tsv_to_store(tsvs, tmp_path / "reference", fp16=True)
    want_new = snapshot(FeatureStore(tmp_path / "reference"))

    def check(n):
        assert snapshot(FeatureStore(out)) in (want_old, want_new), n

    # Re-converting other files with --fp16 (the case): after each TSV, publish (before,
    # after the swap).
    assert kill_everywhere(lambda: convert_tsv_to_store(tsvs, out, fp16=True), check) == 4
    assert snapshot(FeatureStore(out)) == want_new
    no_temps_left(tmp_path)

    # The store records what it was built from; a mismatch says what differs.
    assert store_mismatch(out, tsvs, fp16=True) is None
    assert "fp16" in store_mismatch(out, tsvs, fp16=False)
    assert "converted from" in store_mismatch(out, tsvs[:1], fp16=True)

    monkeypatch.setenv(FAULT, "enospc:1")
    atomic.reset_fault_count()
    with pytest.raises(atomic.DiskFullError) as info:
        convert_tsv_to_store(tsvs[:1], out)
    assert info.value.filename == str(out)
    monkeypatch.delenv(FAULT)
    assert snapshot(FeatureStore(out)) == want_new

    # A store whose data files are short (what the old in-place converter left) is refused on
    # opening, naming the file, before anything is read.
    features = out / "features.bin"
    features.write_bytes(features.read_bytes()[:100])
    with pytest.raises(ValueError, match=str(features)):
        FeatureStore(out)

    # Converting never replaces a directory holding anything but a store.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    with pytest.raises(FileExistsError, match="not a feature store"):
        convert_tsv_to_store(tsvs, tmp_path / "data")
    assert (tmp_path / "data" / "train.json").read_text() == "[]"


# ---------------------------------------------------------------- item 1: checkpoints, latest, lineage


class FakeEngine:
    """Writes a checkpoint tag the way DeepSpeed does: files into save_dir/tag, no `latest`."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest
        path = Path(save_dir, tag)
        path.mkdir(parents=True, exist_ok=True)
        (path / "mp_rank_00_model_states.pt").write_bytes(self.payload + json.dumps(client_state).encode())
        atomic.fault_point(f"{path}: fake DeepSpeed wrote its model states, not yet its optimizer states")
        (path / "optim_states.pt").write_bytes(self.payload)


def new_run(output_dir: Path, run_id: str) -> rundir.Run:
    return rundir.Run(str(output_dir), run_id, f"{socket.gethostname()}-{os.getpid()}")


def assert_complete(ckpt_dir: Path, tag: str, step: int) -> None:
    files = sorted(p.name for p in (ckpt_dir / tag).iterdir())
    assert files == ["mp_rank_00_model_states.pt", "optim_states.pt", "run.json"], (tag, files)
    assert json.loads((ckpt_dir / tag / "run.json").read_text())["step"] == step


def test_killed_checkpoint_save_leaves_latest_on_a_complete_checkpoint(tmp_path):
    engine = FakeEngine(b"weights")
    new_run(tmp_path, "lineage").save_checkpoint(engine, 1, 1, keep=1)
    ckpt = tmp_path / "checkpoints"

    def check(n):
        tag, marker, _ = rundir.choose_checkpoint(str(ckpt))
        assert tag in ("step1", "step2"), n
        assert_complete(ckpt, tag, marker["step"])
        latest = (ckpt / "latest").read_text()
        assert_complete(ckpt, latest, int(latest[4:]))

    # fake DeepSpeed, run.json (2), publish, latest (2), pruning step1.
    save = lambda: new_run(tmp_path, "lineage").save_checkpoint(engine, 2, 2, keep=1)  # noqa: E731
    assert kill_everywhere(save, check) >= 7  # more where a killed attempt left step2 to replace
    assert (ckpt / "latest").read_text() == "step2" and sorted(rundir.complete_checkpoints(str(ckpt))) == [
        "step2"
    ]
    no_temps_left(ckpt)


def test_pruning_touches_only_this_lineage_and_never_the_new_checkpoint(tmp_path):
    engine = FakeEngine(b"w")
    other = new_run(tmp_path, "earlier-run")
    for step in (4, 6):
        other.save_checkpoint(engine, step, step, keep=2)
    mine = new_run(tmp_path, "this-run")
    for step in (1, 2, 3):
        mine.save_checkpoint(engine, step, step, keep=2)
    assert list(rundir.complete_checkpoints(str(tmp_path / "checkpoints"))) == [
        "step2",
        "step3",
        "step4",
        "step6",
    ]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step3"


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoints"
    run = new_run(tmp_path, "r")
    for step in (2, 4):
        run.save_checkpoint(FakeEngine(b"w"), step, step, keep=0)
    (ckpt / "step6").mkdir()  # DeepSpeed's files without run.json: not complete
    assert rundir.choose_checkpoint(str(ckpt))[0] == "step4"
    cases = {
        "": "is empty",
        "step9": "names step9, which does not exist",
        "step6": "step6, which is incomplete",
    }
    for latest, why in cases.items():
        (ckpt / "latest").write_text(latest)
        tag, marker, message = rundir.choose_checkpoint(str(ckpt))
        assert (tag, marker["step"]) == ("step4", 4)
        assert why in message and "continuing from the newest complete checkpoint step4" in message
    (ckpt / "latest").unlink()
    assert "no " + str(ckpt / "latest") in rundir.choose_checkpoint(str(ckpt))[2]
    shutil.rmtree(ckpt / "step2")
    shutil.rmtree(ckpt / "step4")
    assert rundir.choose_checkpoint(str(ckpt))[0] is None


# ---------------------------------------------------------------- item 4: the lock


def test_lock_names_its_holder_and_is_recovered_when_stale(tmp_path):
    path, message = rundir.acquire_lock(str(tmp_path))
    assert message is None
    with pytest.raises(rundir.RunDirError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
        rundir.acquire_lock(str(tmp_path))
    rundir.release_lock(path)
    assert not os.path.exists(path)

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Path(path).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    path, message = rundir.acquire_lock(str(tmp_path))
    assert f"recovered the stale lock {path}: pid {dead.pid}" in message
    assert json.loads(Path(path).read_text())["pid"] == os.getpid()
    rundir.release_lock(path)

    # A reused pid (alive, but started at another time) is stale too; another host's lock is not.
    Path(path).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "proc_start": "1"}))
    assert "recovered the stale lock" in rundir.acquire_lock(str(tmp_path))[1]
    rundir.release_lock(path)
    Path(path).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(rundir.RunDirError, match="in use by another run: pid 1 on elsewhere"):
        rundir.acquire_lock(str(tmp_path))


# ---------------------------------------------------------------- train.py end to end


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The synthetic set of test_train.py."""
    from lxmert_fast.data.synthetic import generate

    path = tmp_path_factory.mktemp("synthetic")
    generate(str(path), num_train=24, num_valid=8, feat_dim=24, seed=1)
    return path


REFERENCE = ("--max_steps", "4", "--save_every", "1", "--keep_checkpoints", "2", "--eval_every", "0")


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """An uninterrupted run (checkpoint at every step, export) and the fault points it passed."""
    out = tmp_path_factory.mktemp("reference") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT, "trace")
        result = run_train(data_dir, out, *REFERENCE)
    points = [
        line.split(": ", 1)[1] for line in result.stderr.splitlines() if line.startswith("fault point: ")
    ]
    return out, points


def train_records(out: Path) -> list[dict]:
    return [{k: r[k] for k in ("step", *LOSS_KEYS, "lr")} for r in read_log(out)[0]]


def final_state(out: Path) -> dict:
    from safetensors.torch import load_file

    ckpt = out / "checkpoints"
    return {
        "log": train_records(out),
        "latest": (ckpt / "latest").read_text(),
        "checkpoints": {
            t: (m["step"], m["micro_step"]) for t, m in rundir.complete_checkpoints(str(ckpt)).items()
        },
        "export": load_file(out / "export" / "model.safetensors"),
        "files": sorted(p.name for p in out.iterdir() if p.name != "train.lock"),
        "checkpoint_files": sorted(p.name for p in ckpt.iterdir()),
    }


def assert_same_state(got: dict, want: dict) -> None:
    assert {k: v for k, v in got.items() if k != "export"} == {k: v for k, v in want.items() if k != "export"}
    assert got["export"].keys() == want["export"].keys()
    for key, value in want["export"].items():
        assert torch.equal(got["export"][key], value), key


def assert_readers_see_complete_files(out: Path, reference_out: Path) -> None:
    ckpt = out / "checkpoints"
    complete = rundir.complete_checkpoints(str(ckpt))
    want_files = sorted(p.name for p in (reference_out / "checkpoints" / "step4").iterdir())
    for tag in complete:
        assert sorted(p.name for p in (ckpt / tag).iterdir()) == want_files, tag
    if (ckpt / "latest").exists():
        assert (ckpt / "latest").read_text() in complete
    if (out / "export").exists():
        lxmert_fast.LxmertForPreTraining.from_pretrained(out / "export")
        assert (out / "export" / "vocab.txt").is_file()
    train_records(out)  # every line of the log parses


def test_train_killed_at_seeded_points_resumes_to_the_uninterrupted_result(
    data_dir, reference, tmp_path, monkeypatch
):
    reference_out, points = reference
    # The points of each phase (the save of step k, the export), as the uninterrupted run met them.
    anchors = [f"/.step{k}{atomic.TEMP_MARK}" for k in (1, 2, 3, 4)] + [f"/.export{atomic.TEMP_MARK}"]
    starts = [next(i for i, p in enumerate(points) if a in p) for a in anchors] + [len(points)]
    rng = random.Random(13)
    out = tmp_path / "out"
    resume: tuple[str, ...] = ()
    for anchor, begin, end in zip(anchors, starts, starts[1:]):  # noqa: B905 (one start more)
        n = rng.randint(1, end - begin)
        monkeypatch.setenv(FAULT, f"{n}@{anchor}")
        killed = run_train(data_dir, out, *REFERENCE, *resume, check=False)
        assert killed.returncode == -signal.SIGKILL, (points[begin + n - 1], killed.stderr[-3000:])
        assert_readers_see_complete_files(out, reference_out)
        resume = ("--resume",)
    monkeypatch.delenv(FAULT)
    result = run_train(data_dir, out, *REFERENCE, "--resume")
    assert "recovered the stale lock" in result.stdout
    assert_same_state(final_state(out), final_state(reference_out))


def test_fresh_run_refuses_another_runs_directory_and_overwrite_replaces_it(data_dir, reference, tmp_path):
    reference_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(reference_out, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = run_train(data_dir, out, "--max_steps", "2", "--save_every", "1", check=False)
    assert refused.returncode != 0
    assert f"--output_dir {out} holds another run's checkpoints, log.jsonl, export" in refused.stderr
    assert "--resume" in refused.stderr and "--overwrite" in refused.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched

    # --overwrite deletes the earlier run first (here also taking over a stale lock), then
    # clean-up keeps this run's newest checkpoints: step1 is pruned, never the new ones.
    (out / "train.lock").write_text(json.dumps({"pid": 2**22 + 1, "host": socket.gethostname()}))
    result = run_train(data_dir, out, "--max_steps", "3", "--save_every", "1", "--no_export", "--overwrite")
    assert (
        "recovered the stale lock" in result.stdout
        and "--overwrite: deleted the previous run's" in result.stdout
    )
    assert sorted(rundir.complete_checkpoints(str(out / "checkpoints"))) == ["step2", "step3"]
    assert not (out / "export").exists() and [r["step"] for r in read_log(out)[0]] == [1, 2, 3]

    # `latest` dangling and a torn newer checkpoint: resume takes the newest complete one and says so.
    (out / "checkpoints" / "latest").write_text("step9")
    (out / "checkpoints" / "step5").mkdir()
    result = run_train(data_dir, out, "--max_steps", "4", "--save_every", "1", "--no_export", "--resume")
    assert (
        "names step9, which does not exist; continuing from the newest complete checkpoint step3"
        in result.stdout
    )
    assert [r["step"] for r in read_log(out)[0]] == [1, 2, 3, 4]
    assert (out / "checkpoints" / "latest").read_text() == "step4"


def test_second_run_on_a_directory_in_use_stops_naming_the_holder(data_dir, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        out = tmp_path / "out"
        out.mkdir()
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "earlier",
                "proc_start": rundir._proc_start(holder.pid)}  # fmt: skip
        (out / "train.lock").write_text(json.dumps(lock))
        result = run_train(data_dir, out, "--resume", check=False)
        assert result.returncode != 0
        assert f"{out} is in use by another run: pid {holder.pid} on {socket.gethostname()}" in result.stderr
        assert json.loads((out / "train.lock").read_text()) == lock and not (out / "log.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_full_disk_at_a_checkpoint_is_reported_with_the_path(data_dir, reference, tmp_path, monkeypatch):
    _, points = reference
    anchor = f"/.step2{atomic.TEMP_MARK}"
    begin = next(i for i, p in enumerate(points) if anchor in p)
    n = 1 + next(i for i, p in enumerate(points[begin:]) if "step2: complete in" in p)
    monkeypatch.setenv(FAULT, f"enospc:{n}@{anchor}")  # the disk fills as step2 is published
    out = tmp_path / "out"
    result = run_train(data_dir, out, *REFERENCE, check=False)
    assert result.returncode != 0
    assert "No space left on device" in result.stderr and f"{out}/checkpoints/.step2" in result.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step1"
    tags = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(("step", "."))]
    assert tags == ["step1"]  # the torn step2 was removed, giving the disk its space back
