"""train.py under DeepSpeed on the CPU (gloo): smoke run, ZeRO stages, exact resume, two processes.

Each run is a subprocess with the tiny preset on a tiny synthetic set; they take seconds each,
most of it importing DeepSpeed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lxmert_testing import train_env

pytest.importorskip("deepspeed")
pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parent.parent
LOSS_KEYS = ("loss", "mlm", "matched", "obj", "attr", "feat", "qa")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from lxmert_fast.data.synthetic import generate

    path = tmp_path_factory.mktemp("synthetic")
    generate(str(path), num_train=24, num_valid=8, feat_dim=24, seed=1)
    return path


def run_train(
    data_dir: Path, out: Path, *extra: str, procs: int = 1, check: bool = True
) -> subprocess.CompletedProcess:
    env = dict(train_env(), OMP_NUM_THREADS="1")
    args = ["--deepspeed_config", str(REPO / "ds.json"), "--data_dir", str(data_dir), "--output_dir", str(out),
            "--preset", "tiny", "--micro_batch", "4", "--max_steps", "4", "--log_every", "1", "--eval_every", "4",
            "--eval_batches", "1", "--save_every", "2", "--cpu_threads", "1", "--no_progress", *extra]  # fmt: skip
    if procs == 1:
        cmd = [sys.executable, str(REPO / "train.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--standalone",
               str(REPO / "train.py"), *args]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    if check and result.returncode != 0:
        pytest.fail(f"train.py exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def read_log(out: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if "split" not in r]
    valid = [r for r in records if r.get("split") == "valid"]
    return train, valid


def test_smoke_one_process_exports_hf(data_dir, tmp_path):
    import torch

    import lxmert_fast

    run_train(data_dir, tmp_path, "--zero_stage", "1")
    train, valid = read_log(tmp_path)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in (*LOSS_KEYS, "lr", "samples_per_s", "tflops", "mlm_acc", "matched_acc", "obj_acc", "attr_acc"):
        assert key in train[-1], key
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert {"matched_acc", "object_word_mlm_acc", "obj_acc", "qa_loss"} <= set(valid[-1])
    assert (tmp_path / "checkpoints" / "step4").is_dir() and (tmp_path / "checkpoints" / "latest").is_file()
    model = lxmert_fast.LxmertForPreTraining.from_pretrained(tmp_path / "export")
    assert model.config.visual_feat_dim == 24 and model.config.hidden_size == 32
    assert (tmp_path / "export" / "vocab.txt").is_file()


@pytest.mark.parametrize(("stage", "precision"), [(2, "fp32"), (3, "fp32"), (3, "bf16")])
def test_zero_stages(data_dir, tmp_path, stage, precision):
    run_train(data_dir, tmp_path, "--zero_stage", str(stage), "--precision", precision, "--grad_accum", "2",
              "--optimizer", "bert_adam", "--obj_loss_on", "masked")  # fmt: skip
    train, valid = read_log(tmp_path)
    assert len(train) == 4 and valid
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_task_switches(data_dir, tmp_path):
    run_train(
        data_dir, tmp_path, "--no-task_qa", "--no-task_matched", "--visual_losses", "feat", "--no_export"
    )
    train, _ = read_log(tmp_path)
    assert {"mlm", "feat"} <= set(train[-1]) and not {"qa", "matched", "obj", "attr"} & set(train[-1])


def test_kill_after_checkpoint_and_resume_is_exact(data_dir, tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    steps = ["--max_steps", "6", "--save_every", "3", "--eval_every", "0", "--no_export"]
    run_train(data_dir, full, *steps)
    killed = run_train(data_dir, broken, *steps, "--kill_after_step", "3", check=False)
    assert killed.returncode != 0  # SIGKILL right after the step-3 checkpoint
    assert [r["step"] for r in read_log(broken)[0]] == [1, 2, 3]
    run_train(data_dir, broken, *steps, "--resume")
    want, got = read_log(full)[0], read_log(broken)[0]
    assert [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(want, got, strict=True):
        assert {k: a[k] for k in (*LOSS_KEYS, "lr")} == {k: b[k] for k in (*LOSS_KEYS, "lr")}, a["step"]


def test_captured_step_trains_like_the_eager_step(data_dir, tmp_path):
    # On CUDA --capture compiles with inductor and replays CUDA graphs; on the CPU aot_eager traces
    # the same graphs and keeps eager's random streams, so the losses must agree step by step.
    steps = ["--max_steps", "3", "--eval_every", "0", "--save_every", "0", "--no_export"]
    run_train(data_dir, tmp_path / "eager", *steps)
    run_train(data_dir, tmp_path / "captured", *steps, "--capture", "--compile_backend", "aot_eager")
    want, got = read_log(tmp_path / "eager")[0], read_log(tmp_path / "captured")[0]
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(want, got, strict=True):
        for key in LOSS_KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_two_processes(data_dir, tmp_path):
    run_train(data_dir, tmp_path, "--zero_stage", "2", procs=2)
    train, valid = read_log(tmp_path)
    assert [r["step"] for r in train] == [1, 2, 3, 4] and valid


def test_synthetic_set_of_an_older_format_is_regenerated(tmp_path):
    import numpy as np

    from lxmert_fast.data import FeatureStore, convert_tsv_to_store, write_feature_tsv
    from lxmert_fast.data.synthetic import NUM_BOXES, feature_file, is_current

    def feature_row(img_id: str, boxes: int, dim: int) -> dict:
        return {"img_id": img_id, "img_h": 10, "img_w": 10, "num_boxes": boxes,
                "objects_id": np.zeros(boxes, np.int64), "objects_conf": np.ones(boxes, np.float32),
                "attrs_id": np.zeros(boxes, np.int64), "attrs_conf": np.ones(boxes, np.float32),
                "boxes": np.ones((boxes, 4), np.float32), "features": np.ones((boxes, dim), np.float32)}  # fmt: skip

    data = tmp_path / "data"
    data.mkdir()
    # What the first generator left: 36-box TSVs, no format version, a store made from them.
    (data / "meta.json").write_text(json.dumps({"num_train": 3, "feat_dim": 24}))
    write_feature_tsv(str(data / "train_obj36.tsv"), [feature_row("old_0", 36, 24)])
    convert_tsv_to_store([data / "train_obj36.tsv"], data / "feature_store")
    result = run_train(data, tmp_path / "out", "--synthetic_images", "24", "--no_export")
    assert "regenerating the synthetic dataset" in result.stdout
    assert is_current(str(data)) and (data / feature_file("train")).is_file()
    store = FeatureStore(data / "feature_store")
    assert "old_0" not in store and store["syn_train_000000"]["num_boxes"] == NUM_BOXES
    train, _ = read_log(tmp_path / "out")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
