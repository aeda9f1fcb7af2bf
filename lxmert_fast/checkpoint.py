"""Checkpoint formats: transformers directories and the authors' ``.pth`` files.

Read:

* a transformers directory: ``config.json`` + ``model.safetensors`` (or a sharded
  ``model.safetensors.index.json``, or ``pytorch_model.bin``, or a sharded ``pytorch_model.bin.index.json``);
* the authors' pre-training checkpoints (``Epoch20_LXRT.pth``, ``model_LXRT.pth``): the
  transformers names with ``module.`` in front (DataParallel) and ``bert.`` for ``lxmert.``;
* the authors' fine-tuned task checkpoints (``BEST.pth`` of VQA/GQA/NLVR2):
  ``lxrt_encoder.model.bert.`` for ``lxmert.`` and ``logit_fc.`` for ``answer_head.logit_fc.``.

Loading is strict: every missing, unexpected or mis-shaped key is reported in one
:class:`CheckpointError` — a silent partial load (the most reported failure of the
original code) is never possible. The one exception is deliberate and explicit: a model
without heads (:class:`~lxmert_fast.LxmertModel`) takes the backbone of a checkpoint that
has heads, and ``backbone_only=True`` starts a model's heads fresh (fine-tuning from
pre-trained weights, as the authors do).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import torch
from torch import nn

from lxmert_fast.atomic import atomic_file, atomic_write_text
from lxmert_fast.config import CONFIG_NAME, LxmertConfig

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
PYTORCH_INDEX_NAME = "pytorch_model.bin.index.json"
WEIGHTS_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_NAME, PYTORCH_INDEX_NAME)
TIED_DECODER = "cls.predictions.decoder.weight"
TIED_SOURCE = "lxmert.embeddings.word_embeddings.weight"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (the message names the file and what is wrong) or does not
    fit the model (the message lists every missing, unexpected and mis-shaped key)."""


_AUTHORS_PREFIXES = (
    ("lxrt_encoder.model.bert.", "lxmert."),
    ("bert.", "lxmert."),
    ("logit_fc.", "answer_head.logit_fc."),
)


def _rename_authors_key(key: str) -> str:
    # DataParallel inserts "module." at any depth (whole model, or lxrt_encoder.model).
    key = re.sub(r"(^|\.)module\.", r"\1", key)
    # Early BERT checkpoints name LayerNorm parameters gamma/beta.
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
    for old, new in _AUTHORS_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def to_hf_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers names for a state dict in any supported layout (authors' or transformers')."""
    return {_rename_authors_key(k): v for k, v in state_dict.items()}


def infer_config(state_dict: dict[str, torch.Tensor], **overrides: Any) -> LxmertConfig:
    """Architecture sizes read off a transformers-named state dict (for configless ``.pth`` files).

    The number of heads cannot be read off the weights; LXMERT uses heads of 64 features,
    so ``hidden_size // 64`` is assumed unless ``num_attention_heads`` is given.
    """
    prefix = "lxmert." if any(k.startswith("lxmert.") for k in state_dict) else ""

    def get(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in state_dict:
            raise CheckpointError(f"cannot infer the architecture: key {key!r} is missing")
        return state_dict[key]

    def count(pattern: str) -> int:
        regex = re.compile(re.escape(prefix) + pattern)
        return len({m.group(1) for k in state_dict if (m := regex.match(k))})

    vocab_size, hidden = get("embeddings.word_embeddings.weight").shape
    values: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_attention_heads": max(hidden // 64, 1),
        "max_position_embeddings": get("embeddings.position_embeddings.weight").shape[0],
        "type_vocab_size": get("embeddings.token_type_embeddings.weight").shape[0],
        "visual_feat_dim": get("encoder.visn_fc.visn_fc.weight").shape[1],
        "visual_pos_dim": get("encoder.visn_fc.box_fc.weight").shape[1],
        "l_layers": count(r"encoder\.layer\.(\d+)\."),
        "x_layers": count(r"encoder\.x_layers\.(\d+)\."),
        "r_layers": count(r"encoder\.r_layers\.(\d+)\."),
    }
    ffn = [
        v
        for k, v in state_dict.items()
        if k.endswith("intermediate.dense.weight") or k.endswith("_inter.dense.weight")
    ]
    if ffn:
        values["intermediate_size"] = ffn[0].shape[0]
    if "answer_head.logit_fc.3.weight" in state_dict:
        values["num_qa_labels"] = state_dict["answer_head.logit_fc.3.weight"].shape[0]
    values["task_qa"] = "answer_head.logit_fc.3.weight" in state_dict
    decoders = {
        "obj": ("num_object_labels", "visual_obj_loss"),
        "attr": ("num_attr_labels", "visual_attr_loss"),
        "feat": ("visual_feat_dim", "visual_feat_loss"),
    }
    has_obj_head = any(k.startswith("obj_predict_head.") for k in state_dict)
    values["task_obj_predict"] = has_obj_head
    for key, (size_field, flag) in decoders.items():
        weight = state_dict.get(f"obj_predict_head.decoder_dict.{key}.weight")
        if weight is not None:
            values[size_field] = weight.shape[0]
        if has_obj_head:
            values[flag] = weight is not None
    values.update(overrides)
    return LxmertConfig(**values)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else '(no message)'}"


def _index_shards(path: str) -> list[str]:
    """The shard file names of a ``model.safetensors.index.json``."""
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a valid JSON shard index ({exc})") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{path}: expected a JSON object with a 'weight_map' of {{tensor name: shard file}}"
        )
    return sorted(set(weight_map.values()))


# DeepSpeed's checkpoint layout: checkpoints/latest, checkpoints/stepN/mp_rank_00_model_states.pt
# (a dict with "module", "buffer_names", "ds_version", ...) and zero_pp_rank_*_optim_states.pt.
_DEEPSPEED_FILE = re.compile(
    r"^(mp_rank_\d+_model_states|(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states)\.pt$"
)
_DEEPSPEED_KEYS = ("buffer_names", "ds_version", "ds_config", "param_shapes")


def _deepspeed_error(path: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {what}, not model weights. Load the run's export/ directory (train.py writes "
        "OUTPUT/export in transformers' format), or convert the checkpoint with DeepSpeed's "
        "zero_to_fp32.py (copied into the checkpoint directory: python zero_to_fp32.py CHECKPOINT_DIR "
        "OUT_DIR) and pass what it writes"
    )


def _is_deepspeed_dir(path: str) -> bool:
    """A DeepSpeed checkpoint tag (stepN/) or the directory of tags (with ``latest``)."""
    names = set(os.listdir(path))
    if any(_DEEPSPEED_FILE.match(n) for n in names):
        return True
    if "latest" in names or "zero_to_fp32.py" in names:
        return any(
            os.path.isdir(os.path.join(path, n))
            and any(map(_DEEPSPEED_FILE.match, os.listdir(os.path.join(path, n))))
            for n in names
        )
    return False


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (``.safetensors``, ``.bin``, ``.pth``, ``.pt``) or directory.

    A DeepSpeed checkpoint (file or directory) is refused with a message pointing to the export
    directory and ``zero_to_fp32.py``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in WEIGHTS_NAMES:
            if os.path.exists(os.path.join(path, name)):
                return read_state_dict(os.path.join(path, name))
        if _is_deepspeed_dir(path):
            raise _deepspeed_error(path, "a DeepSpeed checkpoint directory")
        raise FileNotFoundError(f"{path}: no weights found; expected one of {', '.join(WEIGHTS_NAMES)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    if path.endswith(".index.json"):
        merged: dict[str, torch.Tensor] = {}
        for shard in _index_shards(path):
            merged.update(read_state_dict(os.path.join(os.path.dirname(path), shard)))
        return merged
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
            raise CheckpointError(
                f"{path}: not a readable safetensors file (truncated or corrupted?): {_first_line(exc)}"
            ) from exc
    if _DEEPSPEED_FILE.match(os.path.basename(path)):
        raise _deepspeed_error(path, "a DeepSpeed checkpoint file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises RuntimeError, EOFError, UnpicklingError, KeyError, ...
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated, corrupted, or not written by "
            f"torch.save): {_first_line(exc)}"
        ) from exc
    if isinstance(loaded, dict) and "module" in loaded and any(k in loaded for k in _DEEPSPEED_KEYS):
        raise _deepspeed_error(
            path, "a DeepSpeed checkpoint file (keys 'module', 'buffer_names', 'ds_version', ...)"
        )
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(loaded).__name__}")
    return loaded


def _fit_to_model(model: nn.Module, state_dict: dict[str, torch.Tensor], backbone_only: bool) -> dict:
    own = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "lxmert")
    has_prefix = any(k.startswith(prefix + ".") for k in state_dict)
    wants_prefix = any(k.startswith(prefix + ".") for k in own)
    if has_prefix and not wants_prefix:
        # A backbone takes the backbone of a model with heads; the heads are not its business.
        state_dict = {k[len(prefix) + 1 :]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
    elif wants_prefix and not has_prefix:
        state_dict = {f"{prefix}.{k}": v for k, v in state_dict.items()}
    if backbone_only and wants_prefix:
        state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
        own = {k: v for k, v in own.items() if k.startswith(prefix + ".")}

    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False) and TIED_DECODER in own
    both_present = TIED_DECODER in state_dict and TIED_SOURCE in state_dict
    if tied and both_present and not torch.equal(state_dict[TIED_DECODER], state_dict[TIED_SOURCE]):
        raise CheckpointError(
            f"{TIED_DECODER} differs from {TIED_SOURCE}, but the config ties them (tie_word_embeddings=True)"
        )
    expected = set(own) - ({TIED_DECODER} if tied and TIED_DECODER not in state_dict else set())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(state_dict) & set(own)
        if state_dict[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        heads_only = wants_prefix and not any(
            k.startswith(prefix + ".")
            for k in [*missing, *unexpected, *(m.split(":")[0] for m in mismatched)]
        )
        if heads_only:
            raise _heads_error(model, prefix, missing, unexpected, mismatched)
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {title} key(s):\n  " + "\n  ".join(keys))
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}:\n" + "\n".join(parts))
    return state_dict


def _by_head(keys: list[str]) -> str:
    """``answer_head.* (4 keys), cls.* (9 keys)``: keys grouped by their top-level module."""
    groups: dict[str, int] = {}
    for key in keys:
        groups[key.split(".")[0]] = groups.get(key.split(".")[0], 0) + 1
    return ", ".join(f"{head}.* ({n} key{'s' * (n > 1)})" for head, n in sorted(groups.items()))


def _heads_error(
    model: nn.Module, prefix: str, missing: list[str], unexpected: list[str], mismatched: list[str]
) -> CheckpointError:
    parts = [
        f"{title} {_by_head(keys)}"
        for title, keys in (("missing", missing), ("unexpected", unexpected))
        if keys
    ]
    parts += [f"mis-shaped {m}" for m in mismatched]
    return CheckpointError(
        f"checkpoint does not fit {type(model).__name__}: its backbone ({prefix}.*) fits, its heads do not "
        f"({'; '.join(parts)}). To start the heads fresh on this backbone (fine-tuning from pre-trained "
        f"weights), pass backbone_only=True (and the head's size, e.g. num_qa_labels=N)."
    )


def load_state_dict_strict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], backbone_only: bool = False
) -> None:
    """Load a state dict in any supported naming into ``model``, strictly (see module docs)."""
    fitted = _fit_to_model(model, to_hf_names(state_dict), backbone_only)
    model.load_state_dict(fitted, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub_name_error(path: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{path!r} is not a local file or directory; it looks like a Hugging Face Hub model name. "
        f"lxmert_fast loads local checkpoints only: download it with transformers' tools, e.g. "
        f"`huggingface-cli download {path} --local-dir DIR` or, in Python, "
        f"`transformers.LxmertForPreTraining.from_pretrained({path!r}).save_pretrained(DIR)`, then pass DIR."
    )


def with_overrides(config: LxmertConfig | Any, overrides: dict[str, Any]) -> LxmertConfig:
    """A copy of ``config`` with the fields in ``overrides`` changed (validated like a new config).
    Overriding ``num_qa_labels`` drops answer names (``id2label``) of another count."""
    config = LxmertConfig.from_hf(config)
    if not overrides:
        return config
    unknown = sorted(set(overrides) - set(LxmertConfig.field_names()))
    if unknown:
        raise TypeError(f"from_pretrained: unknown config field(s) {', '.join(unknown)} (see LxmertConfig)")
    labels = config.id2label
    if "num_qa_labels" in overrides and "id2label" not in overrides and labels is not None:
        overrides = {**overrides, "id2label": labels if len(labels) == overrides["num_qa_labels"] else None}
    return dataclasses.replace(config, **overrides)


def load_pretrained(
    cls: type,
    path: str | os.PathLike,
    config: LxmertConfig | None = None,
    backbone_only: bool = False,
    dtype: torch.dtype | None = None,
    **config_overrides: Any,
) -> nn.Module:
    """Build ``cls`` and load the checkpoint at ``path`` (directory or weights file).

    The config comes from ``config``, else ``config.json`` in the directory (or next to the
    file), else it is inferred from the weights (the authors' ``.pth`` files carry none); then
    ``config_overrides`` (field names of :class:`LxmertConfig`) change it. A path that does not
    exist but looks like a Hub name (``org/name``) says how to download it.
    """
    path = os.fspath(path)
    if not os.path.exists(path) and _HUB_NAME.fullmatch(path):
        raise _hub_name_error(path)
    state_dict = to_hf_names(read_state_dict(path))
    if config is None:
        config_dir = path if os.path.isdir(path) else os.path.dirname(path)
        config_file = os.path.join(config_dir, CONFIG_NAME)
        config = (
            LxmertConfig.from_json_file(config_file)
            if os.path.exists(config_file)
            else infer_config(state_dict)
        )
    model = cls(with_overrides(config, config_overrides))
    load_state_dict_strict(model, state_dict, backbone_only=backbone_only)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    """``config.json`` + ``model.safetensors`` loadable by transformers' ``from_pretrained``.

    The tied MLM decoder weight is left out (safetensors stores no aliases); both libraries
    re-tie it from the word embeddings on load. Each file is replaced atomically (never left
    empty or torn); to replace the two together, save into :func:`lxmert_fast.atomic.publishing_dir`.
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    config: LxmertConfig = model.config
    config_dict = config.to_dict()
    config_dict["architectures"] = [type(model).__name__]
    atomic_write_text(
        os.path.join(directory, CONFIG_NAME), json.dumps(config_dict, indent=2, sort_keys=True) + "\n"
    )
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings and TIED_DECODER in tensors:
        del tensors[TIED_DECODER]
    with atomic_file(os.path.join(directory, SAFETENSORS_NAME)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
