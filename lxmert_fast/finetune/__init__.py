"""Fine-tuning on VQA v2, GQA and NLVR2 in the authors' formats (issue #15), one job per module.

* :mod:`.formats` — the authors' task JSON and answer tables, read and checked;
* :mod:`.datasets` — fixed-shape items over the feature store (NLVR2: two images per item);
* :mod:`.models` — :class:`LxmertForNLVR2` (VQA/GQA use :class:`lxmert_fast.LxmertForQuestionAnswering`);
* :mod:`.load_qa` — ``--load_qa``: the pre-training QA head's rows copied by shared answer;
* :mod:`.evaluation` — the evaluators' scores and the device-side running counts;
* :mod:`.submission` — prediction files in the submission formats, written atomically;
* :mod:`.synthetic` — each task's synthetic set, made from the pre-training one, and the
  text-only baseline;
* :mod:`.tasks` — ``TASKS``: what a training loop calls for each task.
"""

from lxmert_fast.finetune.formats import (
    NLVR2Example,
    QAExample,
    read_gqa,
    read_label_tables,
    read_nlvr2,
    read_vqa,
)
from lxmert_fast.finetune.load_qa import QAHeadTransfer, load_pretrained_qa, transfer_qa_head
from lxmert_fast.finetune.models import LxmertForNLVR2
from lxmert_fast.finetune.tasks import TASKS, Task, TaskData

__all__ = [
    "TASKS",
    "LxmertForNLVR2",
    "NLVR2Example",
    "QAExample",
    "QAHeadTransfer",
    "Task",
    "TaskData",
    "load_pretrained_qa",
    "read_gqa",
    "read_label_tables",
    "read_nlvr2",
    "read_vqa",
    "transfer_qa_head",
]
