"""LXMERT configuration with transformers' field names, read from and written to ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "config.json"

# LXMERT uses this LayerNorm epsilon everywhere; transformers hard-codes it too (no config field).
LAYER_NORM_EPS = 1e-12
# Sizes that must be positive integers (a zero or negative size fails later deep inside torch).
POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "num_qa_labels",
    "num_object_labels",
    "num_attr_labels",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "visual_feat_dim",
    "visual_pos_dim",
)


@dataclass
class LxmertConfig:
    """The configuration of an LXMERT model.

    Every field of transformers' ``LxmertConfig`` under the same name and default, so a
    ``config.json`` written by transformers (or by the authors' conversion) loads as it
    is, and :meth:`save_pretrained` writes one transformers loads. Keys this class does not
    know are kept in ``extra`` and written back unchanged.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_attention_heads: int = 12
    num_qa_labels: int = 9500
    num_object_labels: int = 1600
    num_attr_labels: int = 400
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    l_layers: int = 9
    x_layers: int = 5
    r_layers: int = 5
    visual_feat_dim: int = 2048
    visual_pos_dim: int = 4
    visual_loss_normalizer: float = 6.67
    task_matched: bool = True
    task_mask_lm: bool = True
    task_obj_predict: bool = True
    task_qa: bool = True
    visual_obj_loss: bool = True
    visual_attr_loss: bool = True
    visual_feat_loss: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    output_attentions: bool = False
    output_hidden_states: bool = False
    return_dict: bool = True
    # The answer head's labels (transformers' PretrainedConfig fields): answer string per QA label.
    id2label: dict[int, str] | None = field(default=None, repr=False)
    label2id: dict[str, int] | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1], got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size: expected a multiple of num_attention_heads={self.num_attention_heads}, "
                f"got {self.hidden_size}"
            )
        for name in ("l_layers", "x_layers", "r_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative layer count, got {getattr(self, name)}")
        self._check_labels()
        if self.hidden_act not in ("gelu",):
            raise ValueError(
                f"hidden_act: only 'gelu' (exact erf GELU, as LXMERT) is supported, got {self.hidden_act!r}"
            )

    def _check_labels(self) -> None:
        if self.id2label is None:
            self.label2id = None
            return
        try:
            id2label = {int(k): str(v) for k, v in dict(self.id2label).items()}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"id2label: expected a mapping of label ids to answers ({exc})") from exc
        # transformers' placeholder labels (LABEL_0, LABEL_1 of its default num_labels=2) name nothing.
        if all(v == f"LABEL_{k}" for k, v in id2label.items()):
            self.id2label = self.label2id = None
            return
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(
                f"id2label: expected the ids 0..{len(id2label) - 1}, got {sorted(id2label)[:5]}..."
            )
        if len(id2label) != self.num_qa_labels:
            raise ValueError(
                f"id2label: expected one answer per QA label (num_qa_labels={self.num_qa_labels}), "
                f"got {len(id2label)}"
            )
        self.id2label = id2label
        self.label2id = {v: k for k, v in id2label.items()}

    def set_answer_labels(self, answers: list[str]) -> None:
        """Name the answer head's labels: ``id2label[i] = answers[i]`` and ``label2id`` its inverse;
        one answer per QA label (``num_qa_labels``), no duplicates."""
        answers = [str(a) for a in answers]
        if len(answers) != self.num_qa_labels:
            raise ValueError(
                f"answers: expected one per QA label (num_qa_labels={self.num_qa_labels}), got {len(answers)}"
            )
        if len(set(answers)) != len(answers):
            duplicates = sorted({a for a in answers if answers.count(a) > 1})[:5]
            raise ValueError(f"answers: expected distinct answers, got duplicates {duplicates}")
        self.id2label = dict(enumerate(answers))
        self.label2id = {a: i for i, a in enumerate(answers)}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_hidden_layers(self) -> dict[str, int]:
        return {"vision": self.r_layers, "cross_encoder": self.x_layers, "language": self.l_layers}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LxmertConfig:
        known = set(cls.field_names())
        kwargs = {k: v for k, v in values.items() if k in known}
        extra = {k: v for k, v in values.items() if k not in known and k != "extra"}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_hf(cls, hf_config: Any) -> LxmertConfig:
        """From a transformers ``LxmertConfig`` (or any object with the same attributes)."""
        if isinstance(hf_config, LxmertConfig):
            return hf_config
        values = hf_config.to_dict() if hasattr(hf_config, "to_dict") else vars(hf_config)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.field_names()}
        if self.id2label is None:
            del out["id2label"], out["label2id"]
        out.update({k: v for k, v in self.extra.items() if k not in out})
        out["model_type"] = "lxmert"
        return out

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> LxmertConfig:
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a valid JSON config ({exc})") from exc
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(values).__name__}")
        model_type = values.get("model_type", "lxmert")
        if model_type != "lxmert":
            raise ValueError(f"{path}: model_type is {model_type!r}, expected 'lxmert'")
        try:
            return cls.from_dict(values)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LxmertConfig:
        """From a directory holding ``config.json`` or from the JSON file itself."""
        path = os.fspath(path)
        return cls.from_json_file(os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        self.to_json_file(os.path.join(directory, CONFIG_NAME))


def set_answer_labels(target: Any, answers: list[str]) -> None:
    """Name the answer head's labels of a model or config: ``config.id2label`` / ``label2id`` from the
    answer table (``answers[i]`` is QA label ``i``); saved in ``config.json`` by ``save_pretrained``
    and read back by ``from_pretrained``. Raises if the count differs from ``num_qa_labels``."""
    config = target if isinstance(target, LxmertConfig) else target.config
    config.set_answer_labels(answers)
