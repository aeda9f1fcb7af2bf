"""lxmert_fast: LXMERT with fused kernels, exact checkpoint compatibility and ZeRO pre-training.

Quick use::

    import lxmert_fast
    model = lxmert_fast.LxmertForPreTraining.from_pretrained("path/to/dir_or_Epoch20_LXRT.pth")
    out = model(input_ids, visual_feats=feats, visual_pos=boxes, attention_mask=mask)

The names below are imported on first use (PEP 562): ``import lxmert_fast.data`` (a loader worker,
a conversion script) does not pull in the model, its kernels, Triton or DeepSpeed. A submodule is
also reachable as an attribute once ``lxmert_fast`` is imported (``lxmert_fast.ops``).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_EXPORTS = {
    "backend": ("BackendUnavailableError", "current_backend", "set_backend", "use_backend"),
    "checkpoint": ("CheckpointError", "load_state_dict_strict", "save_pretrained"),
    "config": ("LxmertConfig", "set_answer_labels"),
    "inference": ("Answerer", "answer"),
    "layers": ("CrossLayer",),
    "modeling": (
        "LxmertForPreTraining",
        "LxmertForQuestionAnswering",
        "LxmertModel",
        "LxmertPreTrainedModel",
    ),
    "patch": ("apply_to", "replace_cross_layers"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

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


# A bad LXMERT_FAST_BACKEND is an error at ``import lxmert_fast``, as when the backend was imported
# eagerly: the backend module (it pulls in torch.compile's machinery) is imported here only to raise it.
if (os.environ.get("LXMERT_FAST_BACKEND", "").strip().lower() or "auto") not in (
    "auto",
    "reference",
    "triton",
):
    importlib.import_module(f"{__name__}.backend")


def _map_source_tree_kernels() -> None:
    """Serve the source tree's top-level ``kernels/`` as ``lxmert_fast.kernels`` when the package runs
    uninstalled (``PYTHONPATH=<repo>``), so ``import lxmert_fast.kernels.<name>`` works before anything
    imported :mod:`lxmert_fast.ops` (which makes the same mapping); an install maps it itself."""
    import importlib.util
    import sys
    from pathlib import Path

    if importlib.util.find_spec(f"{__name__}.kernels") is not None:
        return
    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        f"{__name__}.kernels", init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_map_source_tree_kernels()


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
