"""The README's run command works as written."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(cwd: Path, *args: str, script: str = "run_batch.py") -> subprocess.CompletedProcess:
    """``examples/SCRIPT ARGS`` as a user runs it (no Triton interpreter); must exit 0."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_run_batch_example(tmp_path):
    proc = run_example(tmp_path, "--batch", "2")
    assert "matching scores (2, 2)" in proc.stdout


def test_run_batch_example_on_a_small_export(tmp_path):
    # Issue #17: on train.py's own export (synthetic vocabulary of ~50 words, 24-d features) the
    # example drew ids from 1000 on (the paper vocabulary) and crashed. The batch now follows the
    # checkpoint's config, and [CLS] / [SEP] come from the export's vocab.txt.
    import torch

    import lxmert_fast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(45)]
    config = lxmert_fast.LxmertConfig(
        vocab_size=len(words), visual_feat_dim=24, num_qa_labels=7, hidden_size=32, num_attention_heads=2,
        intermediate_size=64, l_layers=1, x_layers=1, r_layers=1, max_position_embeddings=12,
    )  # fmt: skip
    torch.manual_seed(0)
    for name, vocab in (("export", words), ("no_vocab", None)):
        export = tmp_path / name
        lxmert_fast.LxmertForPreTraining(config).save_pretrained(export)
        if vocab:
            (export / "vocab.txt").write_text("\n".join(vocab) + "\n")
        proc = run_example(tmp_path, str(export), "--batch", "3")
        assert "MLM logits (3, 12, 50)" in proc.stdout, proc.stdout
        assert "matching scores (3, 2)" in proc.stdout and "QA scores (3, 7)" in proc.stdout


def test_run_batch_token_ids_follow_the_vocabulary(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_batch", ROOT / "examples" / "run_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\ndog\nred\n")
    assert module.token_ids(str(tmp_path), 7) == (2, 3, [5, 6])
    assert module.token_ids(str(tmp_path / "model.safetensors"), 7) == (2, 3, [5, 6])
    assert module.token_ids(None, 30522) == (101, 102, list(range(1000, 30522)))
    assert module.token_ids(None, 10) == (1, 2, list(range(10)))


def test_answer_example_on_an_export(tmp_path):
    # Issue #17 point 4: answers, not logits, on an export laid out as train.py writes it and the
    # synthetic set the default run trains on.
    from test_inference import make_export

    from lxmert_fast.data.synthetic import generate

    data = tmp_path / "synthetic_data"
    generate(str(data), num_train=2, num_valid=5, feat_dim=24, seed=3)
    export = make_export(data, tmp_path / "export")
    proc = run_example(tmp_path, str(export), "--data", str(data), "--images", "3", script="answer.py")
    assert proc.stdout.count("Q: ") == 3 and "top-1 matches the data's answer for" in proc.stdout, proc.stdout
    assert "model LxmertForPreTraining on " in proc.stdout
