"""train.py under ZeRO-3 over two processes: every parameter (the fused Q/K/V ones included) is
partitioned across the ranks, gathered where the leaf modules read it, and trains as under ZeRO-2."""

import pytest
from test_train import LOSS_KEYS, data_dir, read_log, run_train  # noqa: F401 (data_dir: a fixture)


def test_two_processes_zero3_trains_like_zero2(data_dir, tmp_path):  # noqa: F811
    import lxmert_fast

    steps = ("--eval_every", "0", "--save_every", "0")
    run_train(data_dir, tmp_path / "zero2", "--zero_stage", "2", *steps, "--no_export", procs=2)
    run_train(data_dir, tmp_path / "zero3", "--zero_stage", "3", *steps, procs=2)
    want, got = read_log(tmp_path / "zero2")[0], read_log(tmp_path / "zero3")[0]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(want, got, strict=True):
        for key in LOSS_KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    # The export gathered the partitioned fused parameters whole, under transformers' names.
    model = lxmert_fast.LxmertForPreTraining.from_pretrained(tmp_path / "zero3" / "export")
    key = model.state_dict()["lxmert.encoder.x_layers.0.visual_attention.att.key.weight"]
    assert key.shape == (model.config.hidden_size,) * 2
