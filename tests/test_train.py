"""train.py under DeepSpeed on the CPU (gloo): smoke run, ZeRO stages, exact resume, two processes.

Each run is a subprocess with the tiny preset on a tiny synthetic set; they take seconds each,
most of it importing DeepSpeed.
"""

from __future__ import annotations

import json
import re
import shutil
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
    killed = run_train(data_dir, broken, *steps, "--kill_after_step", "3", "--per_rank_log", check=False)
    assert killed.returncode != 0  # SIGKILL right after the step-3 checkpoint
    assert [r["step"] for r in read_log(broken)[0]] == [1, 2, 3]
    # A record written after the checkpoint (a crash between steps): dropped and recomputed on
    # resume, in the per-rank log as in log.jsonl.
    with open(broken / "log.rank0.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "rank": 0, "loss": 0.0}) + "\n")
    run_train(data_dir, broken, *steps, "--resume", "--per_rank_log")
    want, got = read_log(full)[0], read_log(broken)[0]
    assert [r["step"] for r in got] == list(range(1, 7))
    own = [json.loads(line) for line in (broken / "log.rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in own] == list(range(1, 7))
    assert [r["loss"] for r in own] == [r["loss"] for r in got]  # one process: its own values
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
    run_train(data_dir, tmp_path, "--zero_stage", "2", "--per_rank_log", procs=2)
    train, valid = read_log(tmp_path)
    assert [r["step"] for r in train] == [1, 2, 3, 4] and valid
    # Issue #16: the log holds the average over ranks (equal batches: the mean of the two), each
    # rank's own values only on request (--per_rank_log).
    ranks = [
        [json.loads(line) for line in (tmp_path / f"log.rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    for record, own0, own1 in zip(train, *ranks, strict=True):
        assert own0["step"] == own1["step"] == record["step"]
        assert own0["loss"] != own1["loss"]  # different batches
        for key in ("loss", "mlm", "matched", "matched_acc"):
            assert record[key] == pytest.approx((own0[key] + own1[key]) / 2, abs=2e-5), key


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


@pytest.fixture(scope="module")
def train_module():
    """train.py's flags and helpers, as the pre-training job defines them (train.py only calls it)."""
    import functools
    from types import SimpleNamespace

    from lxmert_fast.training import flags, pretrain

    return SimpleNamespace(
        parse_args=functools.partial(pretrain.parse_args, root=str(REPO)),
        ds_config=lambda args, cuda, world=1: flags.ds_config(args, cuda, world, args.default_config),
        total_steps_of=lambda args, per_epoch, cuda: flags.total_steps_of(
            args, per_epoch, *pretrain.default_steps(args, cuda)
        ),
        resume_changes=flags.resume_changes,
        ensure_store=pretrain.ensure_store,
        tensorboard_choice=flags.tensorboard_choice,
    )


BAD_FLAGS = [
    (["--lr", "0"], "--lr: expected a finite number > 0, got 0"),
    (["--micro_batch", "0"], "--micro_batch: expected an integer >= 1, got 0"),
    (["--micro_batch", "-1"], "--micro_batch: expected an integer >= 1, got -1"),
    (["--grad_accum", "0"], "--grad_accum: expected an integer >= 1, got 0"),
    (["--num_boxes", "0"], "--num_boxes: expected an integer >= 1, got 0"),
    (["--max_steps", "0"], "--max_steps: expected an integer >= 1, got 0"),
    (["--max_steps", "-5"], "--max_steps: expected an integer >= 1, got -5"),
    (["--save_every", "-1"], "--save_every: expected an integer >= 0, got -1"),
    (["--keep_checkpoints", "-1"], "--keep_checkpoints: expected an integer >= 0, got -1"),
    (["--weight_mlm", "nan"], "--weight_mlm: expected a finite number >= 0, got nan"),
    (["--lr", "inf"], "--lr: expected a finite number > 0, got inf"),
    (["--epochs", "0"], "--epochs: expected a finite number > 0, got 0"),
    (["--obj_mask_rate", "0"], r"--obj_mask_rate: expected a number in \(0, 1\], got 0"),
    (["--obj_mask_rate", "1.5"], r"--obj_mask_rate: expected a number in \(0, 1\], got 1.5"),
    (["--word_mask_rate", "-0.1"], r"--word_mask_rate: expected a number in \[0, 1\], got -0.1"),
    (["--mismatch_rate", "2"], r"--mismatch_rate: expected a number in \[0, 1\], got 2"),
    (["--seed", "-1"], r"--seed: expected an integer in \[0, 2147483647\], got -1"),
    (["--max_seq_len", "1"], "--max_seq_len: expected an integer >= 3, got 1"),
    (["--log_every", "0"], "--log_every: expected an integer >= 1, got 0"),
    (["--micro_batch", "two"], "--micro_batch: expected an integer >= 1, got 'two'"),
    (["--visual_losses", "obj,box"], "--visual_losses: expected a comma-separated subset of obj,attr,feat"),
    ([f"--no-task_{t}" for t in ("mlm", "matched", "obj", "qa")], "every task is off"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_are_argparse_errors_naming_the_flag(train_module, capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        train_module.parse_args(argv)
    assert exited.value.code == 2
    assert re.search(message, capsys.readouterr().err), message


def test_explicit_flags_are_used_not_defaults(train_module):
    args = train_module.parse_args(["--epochs", "1", "--micro_batch", "3", "--grad_accum", "2"])
    assert train_module.total_steps_of(args, per_epoch=6, cuda=False) == 6  # not the synthetic 1000
    config = train_module.ds_config(args, cuda=False)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (3, 2)
    assert train_module.total_steps_of(train_module.parse_args([]), per_epoch=6, cuda=False) == 1000
    assert train_module.total_steps_of(train_module.parse_args(["--max_steps", "7"]), 6, cuda=False) == 7
    with pytest.raises(
        SystemExit, match=r"--epochs 0\.1: 0\.1 x 6 optimizer steps per epoch is less than one"
    ):
        train_module.total_steps_of(train_module.parse_args(["--epochs", "0.1"]), 6, cuda=False)


def test_train_batch_size_in_ds_json_is_honoured_or_refused(train_module, tmp_path):
    # Issue #17: train_batch_size in ds.json was silently dropped.
    def config(ds: dict, *argv: str, world: int = 1) -> dict:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds))
        args = train_module.parse_args(["--deepspeed_config", str(path), *argv])
        return train_module.ds_config(args, cuda=False, world=world)

    def batch(c: dict) -> tuple[int, int]:
        return c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]

    assert batch(config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8})) == (8, 8)
    assert batch(config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}, world=2)) == (8, 4)
    assert batch(config({"train_batch_size": 64}, "--micro_batch", "16")) == (16, 4)
    assert batch(
        config({"train_batch_size": 64, "gradient_accumulation_steps": 2}, "--micro_batch", "32")
    ) == (
        32,
        2,
    )
    assert "train_batch_size" not in config({"train_batch_size": 32})  # 32 x 1 x 1: DeepSpeed derives it
    with pytest.raises(SystemExit, match=r"train_batch_size 64 disagrees with micro batch 8 x gradient "
                       r"accumulation 2 x world size 1 = 16"):  # fmt: skip
        config(
            {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}
        )
    with pytest.raises(SystemExit, match=r"train_batch_size 64 disagrees .* = 24"):
        config({"train_batch_size": 64}, "--micro_batch", "8", "--grad_accum", "3")
    with pytest.raises(
        SystemExit, match=r"train_batch_size 60 is not a multiple of micro batch 8 x world size 1"
    ):
        config({"train_batch_size": 60, "train_micro_batch_size_per_gpu": 8})
    with pytest.raises(SystemExit, match=r"train_batch_size: expected a positive integer, got 0"):
        config({"train_batch_size": 0})


def test_tensorboard_flag(train_module):
    # Issue #17: TensorBoard was used silently when installed; now a flag, announced at start-up.
    assert train_module.parse_args([]).tensorboard is None
    assert train_module.parse_args(["--tensorboard"]).tensorboard is True
    assert train_module.parse_args(["--no-tensorboard"]).tensorboard is False
    choice = train_module.tensorboard_choice
    assert choice(None, installed=True) == (True, "TensorBoard in OUTPUT/tensorboard")
    assert choice(None, installed=False) == (False, "no TensorBoard")
    assert choice(False, installed=True) == (False, "no TensorBoard")
    assert choice(True, installed=True)[0] is True
    with pytest.raises(SystemExit, match="--tensorboard: the tensorboard package is not installed"):
        choice(True, installed=False)


def test_export_answer_table_is_filtered_and_samples_per_s_leaves_out_evaluation(data_dir, tmp_path):
    # Issue #17: the export copied the unfiltered answer table (13 answers for 12 labels with
    # --answer_dsets vqa), and samples/s after an evaluation counted the evaluation's time.
    result = run_train(data_dir, tmp_path, "--answer_dsets", "vqa", "--max_steps", "4", "--eval_every", "2",
                       "--log_every", "1", "--save_every", "0", "--eval_delay", "3", "--no-tensorboard")  # fmt: skip
    assert "; no TensorBoard" in result.stdout and not (tmp_path / "tensorboard").exists()
    table = json.loads((tmp_path / "export" / "all_ans.json").read_text())
    full = json.loads((data_dir / "all_ans.json").read_text())
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert len(table) == config["num_qa_labels"] == len(full) - 1
    assert table == [e for e in full if "vqa" in e["dsets"]]
    train, valid = read_log(tmp_path)
    assert [r["step"] for r in valid] == [2, 4]
    # Step 3's window holds the 3-second evaluation after step 2: with it, 4 samples / >3 s.
    rates = {r["step"]: r["samples_per_s"] for r in train}
    assert rates[3] > 4 / 3 * 2, rates
    assert rates[3] > min(rates[1], rates[2], rates[4]) / 10, rates


def test_resume_flag_changes_are_refused_or_announced(train_module):
    recorded = {"micro_batch": 4, "zero_stage": 1, "lr": 1e-3, "total_steps": 4, "seed": 0}
    error, notes = train_module.resume_changes(
        recorded, {**recorded, "micro_batch": 8, "zero_stage": 2}, "step4"
    )
    assert "step4 was trained with --micro_batch 4 (now 8); --zero_stage 1 (now 2)" in error
    error, notes = train_module.resume_changes(recorded, {**recorded, "lr": 2e-3}, "step4")
    assert error is None and notes == [
        "--resume: --lr changed from 0.001 to 0.002: the new peak learning rate applies from this step "
        "(same warmup and decay shape)"
    ]
    assert "records no flags" in train_module.resume_changes(None, recorded, "step4")[1][0]


def test_feature_store_of_other_files_is_rebuilt_or_refused(train_module, tmp_path, capsys):
    # --features new.tsv with DATA_DIR/feature_store converted from other files: never used in their place.
    from lxmert_fast.data import FeatureStore, read_feature_tsv
    from lxmert_fast.data.synthetic import feature_file, generate

    generate(str(tmp_path), num_train=3, num_valid=2, feat_dim=4, seed=0)
    old, new = str(tmp_path / feature_file("train")), str(tmp_path / feature_file("valid"))
    store = str(tmp_path / "feature_store")
    train_module.ensure_store([old], store, fp16=False, explicit=False)
    train_module.ensure_store([old], store, fp16=False, explicit=False)  # current: not converted again
    assert capsys.readouterr().out.count("converting") == 1
    with pytest.raises(
        SystemExit, match=r"--store_dir .*feature_store: not a conversion of --features as given"
    ):
        train_module.ensure_store([new], store, fp16=False, explicit=True)
    train_module.ensure_store([new], store, fp16=False, explicit=False)
    assert "re-converting the feature store" in capsys.readouterr().out
    assert set(FeatureStore(store).keys()) == {row["img_id"] for row in read_feature_tsv(new)}


def test_resume_applies_a_new_lr_and_refuses_a_new_micro_batch(data_dir, tmp_path):
    steps = ["--eval_every", "0", "--no_export", "--save_every", "2"]
    run_train(data_dir, tmp_path, *steps, "--max_steps", "2")
    resumed = run_train(data_dir, tmp_path, *steps, "--max_steps", "4", "--lr", "2e-3", "--resume")
    assert "--resume: --lr changed from 0.001 to 0.002: the new peak learning rate applies" in resumed.stdout
    assert "--resume: --max_steps / --epochs changed from 2 to 4" in resumed.stdout
    train, _ = read_log(tmp_path)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # The new schedule (4 steps, 1 warmup step, peak 2e-3) from the resumed step on.
    assert train[2]["lr"] == pytest.approx(2e-3 * (4 - 3) / (4 - 1))
    refused = run_train(
        data_dir, tmp_path, *steps, "--max_steps", "6", "--micro_batch", "2", "--resume", check=False
    )
    assert refused.returncode != 0
    assert "step4 was trained with --micro_batch 4 (now 2)" in refused.stderr
    assert "These cannot change when resuming" in refused.stderr


def test_nonfinite_loss_stops_naming_the_step_and_term(data_dir, tmp_path):
    # NaN features for one image (written into the converted store, past the converter's checks):
    # the run stops at the next read of the device-side flags, naming the first bad step, exit != 0.
    import shutil

    import numpy as np

    from lxmert_fast.data import (
        AnswerTable,
        EpochBatchSampler,
        FeatureStore,
        build_examples,
        convert_tsv_to_store,
        load_pretrain_json,
    )
    from lxmert_fast.data.synthetic import SPLITS, feature_file

    data = tmp_path / "data"
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns("feature_store"))
    convert_tsv_to_store([data / feature_file(s) for s in SPLITS], data / "feature_store", fp16=True)
    store = FeatureStore(data / "feature_store")
    table = AnswerTable.load(data / "all_ans.json")
    examples = build_examples(load_pretrain_json(data / "train.json"), table, image_ids=store.keys())
    batches = [[examples[i].img_id for i in b] for b in EpochBatchSampler(len(examples), 4, seed=0)]
    bad = next(img for img in batches[2] if img not in batches[0] + batches[1])  # first seen at step 3
    start, n, _, _ = store.images[bad]
    features = np.memmap(data / "feature_store" / "features.bin", dtype=np.float16, mode="r+")
    features.reshape(-1, store.feature_dim)[start : start + n] = np.nan
    features.flush()
    del features

    out = tmp_path / "out"
    result = run_train(data, out, "--max_steps", "4", "--log_every", "4", "--save_every", "2", "--eval_every", "0",
                       "--no_export", check=False)  # fmt: skip
    assert result.returncode != 0
    assert re.search(
        r"step 3 \(micro-step 2\): the [a-z, ]+ loss is NaN or Inf; training stopped", result.stderr
    )
    assert (out / "checkpoints" / "step2").is_dir() and not (out / "checkpoints" / "step4").exists()


def test_authors_formats_train_through_the_corpus_store(data_dir, tmp_path):
    # Issue #14: --train/--valid JSON and --features TSVs (the authors' files) through the corpus
    # store and the batch loader; a stale corpus named by --corpus_dir is refused, never read.
    from lxmert_fast.data.synthetic import SPLITS, feature_file

    data = tmp_path / "authors"
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns("feature_store", "corpus_*"))
    files = ["--data_dir", str(tmp_path / "unused"), "--train", str(data / "train.json"), "--valid",
             str(data / "valid.json"), "--features", ",".join(str(data / feature_file(s)) for s in SPLITS),
             "--vocab", str(data / "vocab.txt"), "--answer_table", str(data / "all_ans.json"),
             "--store_dir", str(tmp_path / "store"), "--corpus_dir", str(tmp_path / "corpus"),
             "--num_boxes", "8", "--max_seq_len", "12"]  # fmt: skip
    result = run_train(
        data_dir, tmp_path / "out", *files, "--max_steps", "2", "--save_every", "0", "--eval_every", "2"
    )
    assert "building the corpus store" in result.stdout
    assert (tmp_path / "corpus" / "corpus_train" / "index.json").is_file()
    assert (tmp_path / "corpus" / "corpus_valid" / "index.json").is_file()
    _, valid = read_log(tmp_path / "out")
    assert valid and "qa_acc" in valid[-1]
    records = json.loads((data / "train.json").read_text())
    (data / "train.json").write_text(json.dumps(records[:-1]))  # the corpus is now stale
    refused = run_train(data_dir, tmp_path / "out2", *files, "--max_steps", "2", check=False)
    assert refused.returncode != 0
    assert "--corpus_dir" in refused.stderr and "not a corpus store of the data as given" in refused.stderr
