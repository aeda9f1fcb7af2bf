"""Two simulated nodes of one process each on this machine (issue #16), through DeepSpeed's launcher
(``--hostfile --no_ssh --node_rank``) and through ``torchrun --nnodes 2``, with one shared output
and data directory and with a directory per node (node-local disks: each node is given its own
paths). Every layout must train exactly like one node of two processes: the same logged losses
and byte-identical exports; a killed run resumes to the same export; a node that lost its
checkpoints is refused, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from lxmert_testing import train_env

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parent.parent
ARGS = ["--deepspeed_config", str(REPO / "ds.json"), "--preset", "tiny", "--micro_batch", "4",
        "--max_steps", "4", "--log_every", "1", "--eval_every", "4", "--eval_batches", "1",
        "--save_every", "2", "--cpu_threads", "1", "--no_progress", "--no-tensorboard",
        "--synthetic_images", "24", "--dist_timeout", "2"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    launcher: str,
    node_dirs: list[tuple[Path, Path]],
    *extra: str,
    tmp: Path,
    node_extra: dict[int, list[str]] | None = None,
) -> list[subprocess.CompletedProcess]:
    """Start one launcher per node (``node_dirs[i]``: node i's data and output directories; flags for
    all nodes, and ``node_extra[i]`` for node i only), wait for all."""
    env = dict(train_env(), OMP_NUM_THREADS="1")
    port = free_port()
    hostfile = tmp / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    procs = []
    for node, (data, out) in enumerate(node_dirs):
        paths = ["--data_dir", str(data), "--output_dir", str(out)]
        if launcher == "deepspeed":
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                   "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]  # fmt: skip
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]  # fmt: skip
        cmd += [str(REPO / "train.py"), *ARGS, *paths, *extra, *(node_extra or {}).get(node, [])]
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def ok(results: list[subprocess.CompletedProcess]) -> None:
    for node, r in enumerate(results):
        if r.returncode != 0:
            pytest.fail(f"node {node} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")


def export_digest(out: Path) -> str:
    return hashlib.sha256((out / "export" / "model.safetensors").read_bytes()).hexdigest()


def losses(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "tflops")} for r in records]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> Path:
    """The reference: one node of two processes (torchrun --standalone), uninterrupted."""
    tmp = tmp_path_factory.mktemp("one_node")
    env = dict(train_env(), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(REPO / "train.py"), *ARGS, "--data_dir", str(tmp / "data"), "--output_dir", str(tmp / "out")]  # fmt: skip
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    ok([result])
    return tmp / "out"


def layout_dirs(tmp: Path, layout: str) -> list[tuple[Path, Path]]:
    if layout == "shared":
        return [(tmp / "data", tmp / "out")] * 2
    return [(tmp / f"node{n}" / "data", tmp / f"node{n}" / "out") for n in range(2)]


@pytest.mark.parametrize("layout", ["shared", "node-local"])
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_nodes_train_like_one_node_and_resume_exactly(one_node, tmp_path, launcher, layout):
    dirs = layout_dirs(tmp_path, layout)
    killed = launch(launcher, dirs, "--kill_after_step", "2", tmp=tmp_path)
    assert all(r.returncode != 0 for r in killed)
    for _, out in dirs:
        assert (out / "checkpoints" / "latest").read_text() == "step2"
        assert sorted(
            p.name for p in (out / "checkpoints" / "step2").iterdir() if p.name.startswith("mp_rank")
        )
    resumed = launch(launcher, dirs, "--resume", tmp=tmp_path)
    ok(resumed)
    expected = (
        "node-local output, node-local data" if layout == "node-local" else "shared output, shared data"
    )
    assert expected in resumed[0].stdout
    assert "resuming at step 2" in resumed[0].stdout
    node0 = dirs[0][1]
    assert export_digest(node0) == export_digest(one_node)
    assert losses(node0) == losses(one_node)
    if layout == "node-local":
        # Each node prepared its own data, and holds every checkpoint file it needs to resume.
        assert (dirs[1][0] / "feature_store").is_dir() and not (dirs[1][1] / "export").exists()
        for _, out in dirs:
            assert (out / "checkpoints" / "latest").read_text() == "step4"
            assert [p.name for p in sorted((out / "checkpoints").glob("step*"))] == ["step2", "step4"]


def test_node_local_resume_with_a_node_missing_its_checkpoints_is_refused(tmp_path):
    dirs = layout_dirs(tmp_path, "node-local")
    ok(launch("deepspeed", dirs, "--max_steps", "2", "--no_export", tmp=tmp_path))
    (dirs[1][1] / "checkpoints" / "latest").unlink()
    refused = launch("deepspeed", dirs, "--resume", "--max_steps", "4", tmp=tmp_path)
    assert all(r.returncode != 0 for r in refused)
    message = refused[0].stdout + refused[0].stderr
    assert "--resume on node-local disks: the nodes of rank(s) 1 have no checkpoints/latest" in message
    assert "rank 0: latest step2, complete checkpoints step2; rank 1: latest missing" in message
    assert "step3" not in (dirs[0][1] / "log.jsonl").read_text()


def test_a_hung_node_ends_the_job_within_the_collective_timeout(tmp_path):
    # Node 1 hangs after step 2 (SIGSTOP: alive, its sockets open, silent); node 0's next collective
    # must fail after --dist_timeout (here 0.2 minutes) and the job end with an error, not wait.
    import os
    import signal
    import time

    (_, out0), (_, out1) = layout_dirs(tmp_path, "node-local")
    port, env = free_port(), dict(train_env(), OMP_NUM_THREADS="1")
    procs = []
    for node, (out, extra) in enumerate([(out0, []), (out1, ["--stop_after_step", "2"])]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
               str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), str(REPO / "train.py"), *ARGS,
               "--data_dir", str(tmp_path / f"data{node}"), "--output_dir", str(out), "--dist_timeout", "0.2",
               "--max_steps", "8", "--save_every", "0", *extra]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))  # fmt: skip
    start = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=240)
        elapsed = time.monotonic() - start
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert procs[0].returncode != 0
    assert "Timed out" in err or "timed out" in err, err[-3000:]
    assert elapsed < 200, elapsed


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LOCAL_WORLD_SIZE": "8"}, 8),  # torchrun
        ({"LOCAL_SIZE": "4"}, 4),  # DeepSpeed's launcher (it sets no LOCAL_WORLD_SIZE)
        ({"SLURM_NTASKS_PER_NODE": "2"}, 2),
        ({"LOCAL_WORLD_SIZE": "8", "LOCAL_SIZE": "4"}, 8),
        ({}, 1),  # no launcher variable, no process group: this process alone
    ],
)
def test_processes_per_node_come_from_the_launcher(monkeypatch, env, expected):
    # Issue #16: --cpu_threads' default read only LOCAL_WORLD_SIZE, which DeepSpeed's launcher does
    # not set, and fell back to the global world size (8 ranks on each of 2 nodes of 64 cores got 3
    # threads instead of 7).
    from lxmert_fast.training import dist

    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert dist.local_world_size() == expected
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert dist.cpu_threads(None, dist.local_world_size()) == max(1, 64 // expected - 1)
    assert dist.cpu_threads(5, dist.local_world_size()) == 5
