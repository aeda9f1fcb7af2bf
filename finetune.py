"""LXMERT fine-tuning and evaluation on VQA v2, GQA and NLVR2 under DeepSpeed ZeRO.

    deepspeed finetune.py --task vqa --deepspeed_config ds.json --load runs/pretrain/export
    deepspeed finetune.py --task vqa --deepspeed_config ds.json --load_qa snap/pretrained/model_LXRT.pth \\
        --train data/vqa/train.json,data/vqa/nominival.json --valid data/vqa/minival.json \\
        --features data/mscoco_imgfeat/train2014_obj36.tsv,data/mscoco_imgfeat/val2014_obj36.tsv
    python finetune.py --task nlvr2 --test --load_finetuned runs/finetune/export   # evaluate only

With no data flags the task's synthetic set (``python -m lxmert_fast.finetune.synthetic``) is
generated into ``--data_dir`` (next to the pre-training synthetic set, whose images it uses).
The loop is pre-training's (``train.py``): the same flags for batch size, ZeRO, precision,
capture, checkpoints, ``--resume``, logging and export; see ``--help``.
"""

from __future__ import annotations

import os

from lxmert_fast.training.finetune import main

if __name__ == "__main__":
    main(root=os.path.dirname(os.path.abspath(__file__)), doc=__doc__)
