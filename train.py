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

import os

from lxmert_fast.training.pretrain import main

if __name__ == "__main__":
    main(root=os.path.dirname(os.path.abspath(__file__)), doc=__doc__)
