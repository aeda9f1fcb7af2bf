"""lxmert_fast: LXMERT with fused kernels, exact checkpoint compatibility and ZeRO pre-training.

Quick use::

    import lxmert_fast
    model = lxmert_fast.LxmertForPreTraining.from_pretrained("path/to/dir_or_Epoch20_LXRT.pth")
    out = model(input_ids, visual_feats=feats, visual_pos=boxes, attention_mask=mask)
"""

from lxmert_fast.backend import BackendUnavailableError, current_backend, set_backend, use_backend
from lxmert_fast.checkpoint import CheckpointError, load_state_dict_strict, save_pretrained
from lxmert_fast.config import LxmertConfig, set_answer_labels
from lxmert_fast.inference import Answerer, answer
from lxmert_fast.layers import CrossLayer
from lxmert_fast.modeling import (
    LxmertForPreTraining,
    LxmertForQuestionAnswering,
    LxmertModel,
    LxmertPreTrainedModel,
)
from lxmert_fast.patch import apply_to, replace_cross_layers

__version__ = "0.1.0"

__all__ = [
    "Answerer",
    "BackendUnavailableError",
    "CheckpointError",
    "CrossLayer",
    "LxmertConfig",
    "LxmertForPreTraining",
    "LxmertForQuestionAnswering",
    "LxmertModel",
    "LxmertPreTrainedModel",
    "answer",
    "apply_to",
    "current_backend",
    "load_state_dict_strict",
    "replace_cross_layers",
    "save_pretrained",
    "set_answer_labels",
    "set_backend",
    "use_backend",
]
