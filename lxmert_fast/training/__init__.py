"""The training loop every job shares (pre-training, fine-tuning) and its pieces.

* :mod:`.flags`: argparse types and the flags every job takes (optimisation, run, DeepSpeed).
* :mod:`.dist`: process-group set-up, per-node facts (local world size, node-local disks).
* :mod:`.loop`: engine set-up, schedule, capture, logging, evaluation, checkpoints, exact
  resume and export, driven by a :class:`.loop.Job`.
* :mod:`.pretrain`: the pre-training job (``train.py``); :mod:`.finetune`: VQA, GQA, NLVR2.
"""

from __future__ import annotations

import os

import torch

# DeepSpeed picks its accelerator when it is first imported, and argparse's DeepSpeed flags
# import it: without a GPU it must be told the CPU before any of that.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
