"""LXMERT models: backbone, pre-training heads and losses, question answering.

Module tree, parameter names, output tuples and numerics follow transformers'
``modeling_lxmert`` (eval-mode outputs agree within 1e-5 in fp32), so a transformers
state dict loads with ``strict=True`` and ours loads back into transformers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from lxmert_fast.checks import check_all, check_shape, check_tensor, check_values_in_range, describe
from lxmert_fast.config import LAYER_NORM_EPS, LxmertConfig
from lxmert_fast.layers import Attention, CrossLayer, Layer, VisualFeatureEncoder, mask_to_bias
from lxmert_fast.outputs import (
    LxmertForPreTrainingOutput,
    LxmertForQuestionAnsweringOutput,
    LxmertModelOutput,
)

Tensor = torch.Tensor

# Slack for boxes computed as pixel / image size in low precision.
BOX_RANGE_TOLERANCE = 1e-4


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout (transformers' ``LxmertEmbeddings``)."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(
            config.max_position_embeddings, config.hidden_size, padding_idx=0
        )
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: Tensor | None, token_type_ids: Tensor, inputs_embeds: Tensor | None
    ) -> Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        embeddings = (
            inputs_embeds
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(embeddings))


class Encoder(nn.Module):
    """Visual embedding, language layers, object (relational) layers, cross-modality layers."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.visn_fc = VisualFeatureEncoder(config)
        self.layer = nn.ModuleList([Layer(config) for _ in range(config.l_layers)])
        self.x_layers = nn.ModuleList([CrossLayer(config) for _ in range(config.x_layers)])
        self.r_layers = nn.ModuleList([Layer(config) for _ in range(config.r_layers)])
        self.gradient_checkpointing = False
        self.checkpoint_kwargs: dict[str, Any] = {}

    def _run(self, layer: Callable, *args: Any) -> Any:
        """``layer(*args)``, its activations recomputed in the backward when checkpointing in training
        (the RNG state is restored for the recomputation, so dropout draws the same masks)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(layer, *args, **self.checkpoint_kwargs)
        return layer(*args)

    def forward(
        self,
        lang: Tensor,
        lang_bias: Tensor | None,
        visual_feats: Tensor,
        visual_pos: Tensor,
        visual_bias: Tensor | None,
        need_probs: bool,
    ) -> tuple[Tensor, Tensor, tuple[Tensor, ...], tuple[Tensor, ...], tuple, tuple, tuple]:
        """Returns (language output, vision output, language states, vision states, language
        probs, vision probs, cross probs); each states tuple holds one entry per single-stream
        layer, then one per cross layer (transformers' order)."""
        visual = self.visn_fc(visual_feats, visual_pos)
        lang_states, visual_states, lang_probs, visual_probs, cross_probs = [], [], [], [], []
        for layer in self.layer:
            lang, probs = self._run(layer, lang, lang_bias, need_probs)
            lang_states.append(lang)
            lang_probs.append(probs)
        for layer in self.r_layers:
            visual, probs = self._run(layer, visual, visual_bias, need_probs)
            visual_states.append(visual)
            visual_probs.append(probs)
        for layer in self.x_layers:
            lang, visual, probs = self._run(
                layer.forward_biases, lang, lang_bias, visual, visual_bias, need_probs
            )
            lang_states.append(lang)
            visual_states.append(visual)
            cross_probs.append(probs)
        states = (tuple(lang_states), tuple(visual_states))
        return lang, visual, *states, tuple(lang_probs), tuple(visual_probs), tuple(cross_probs)


class Pooler(nn.Module):
    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class PredictionHeadTransform(nn.Module):
    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(hidden_states)))


def gather_positions(x: Tensor, positions: Tensor) -> Tensor:
    """Rows ``positions`` of ``x`` [B, T, ...] flattened over (B, T): [K, ...].

    ``positions`` int64 [K] holds flat indices ``b * T + t``; a padding entry (-1) reads row 0,
    so the caller must give it no weight (label -1, weight 0). The shape depends only on K,
    never on the values: no host sync, nothing data-dependent for a compiled graph.
    """
    return x.reshape(-1, *x.shape[2:]).index_select(0, positions.clamp(min=0))


class LMPredictionHead(nn.Module):
    """Masked-LM head: transform, decoder tied to the word embeddings, separate bias.

    With ``positions`` (flat indices, see :func:`gather_positions`) only those rows of
    ``hidden_states`` [B, T, H] are decoded: [K, vocab] instead of [B, T, vocab].
    """

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.transform = PredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: Tensor, positions: Tensor | None = None) -> Tensor:
        if positions is not None:
            hidden_states = gather_positions(hidden_states, positions)
        return self.decoder(self.transform(hidden_states)) + self.bias


class PreTrainingHeads(nn.Module):
    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.predictions = LMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


def visual_loss_specs(config: LxmertConfig) -> dict[str, int]:
    """The visual pre-training outputs enabled by ``config`` and their widths, in transformers' order."""
    specs = {}
    if config.visual_obj_loss:
        specs["obj"] = config.num_object_labels
    if config.visual_attr_loss:
        specs["attr"] = config.num_attr_labels
    if config.visual_feat_loss:
        specs["feat"] = config.visual_feat_dim
    return specs


class VisualObjHead(nn.Module):
    """Object, attribute and feature predictions on every vision token (shared transform).

    With ``feat_positions`` (flat indices into B*N, see :func:`gather_positions`) the feature
    decoder runs on those rows only: ``"feat"`` is [K, feat_dim]; object and attribute logits
    stay [B, N, width] (their loss may cover every object).
    """

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.transform = PredictionHeadTransform(config)
        self.decoder_dict = nn.ModuleDict(
            {key: nn.Linear(config.hidden_size, width) for key, width in visual_loss_specs(config).items()}
        )

    def forward(self, hidden_states: Tensor, feat_positions: Tensor | None = None) -> dict[str, Tensor]:
        hidden_states = self.transform(hidden_states)
        out = {}
        for key, decoder in self.decoder_dict.items():
            sparse = key == "feat" and feat_positions is not None
            out[key] = decoder(gather_positions(hidden_states, feat_positions) if sparse else hidden_states)
        return out


class GeLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x)


class VisualAnswerHead(nn.Module):
    """QA head: hidden -> 2*hidden -> GELU -> LayerNorm -> answers."""

    def __init__(self, config: LxmertConfig, num_labels: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.logit_fc = nn.Sequential(
            nn.Linear(hidden, hidden * 2),
            GeLU(),
            nn.LayerNorm(hidden * 2, eps=LAYER_NORM_EPS),
            nn.Linear(hidden * 2, num_labels),
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.logit_fc(hidden_states)


class LxmertPreTrainedModel(nn.Module):
    """Weight initialisation and checkpoint I/O shared by the LXMERT models."""

    base_model_prefix = "lxmert"

    def __init__(self, config: LxmertConfig | Any) -> None:
        super().__init__()
        self.config = LxmertConfig.from_hf(config)

    def init_weights(self, modules: list[nn.Module] | None = None) -> None:
        """transformers' initialisation of ``modules`` (default: the whole model): N(0,
        initializer_range) weights, zero biases, unit LayerNorms; then re-tie weights."""
        std = self.config.initializer_range
        for module in (m for root in (modules or [self]) for m in root.modules()):
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, Attention):
                # Query, key and value rows in turn, as transformers' three nn.Linear.
                for rows in module.qkv_weight.chunk(3):
                    nn.init.normal_(rows, 0.0, std)
                nn.init.zeros_(module.qkv_bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LMPredictionHead):
                nn.init.zeros_(module.bias)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Point output embeddings at the input embeddings where the model has and wants them tied."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        """Distinct trainable parameters (tied weights counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Recompute each encoder layer's activations in the backward instead of keeping them (training
        only), as transformers' method of the same name: less memory, one more forward per layer.
        ``gradient_checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint``
        (default ``use_reentrant=False``)."""
        for module in self.modules():
            if isinstance(module, Encoder):
                module.gradient_checkpointing = True
                module.checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, Encoder):
                module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(m.gradient_checkpointing for m in self.modules() if isinstance(m, Encoder))

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        config: LxmertConfig | Any | None = None,
        torch_dtype: torch.dtype | None = None,
        *,
        backbone_only: bool = False,
        dtype: torch.dtype | None = None,
        **config_overrides: Any,
    ):
        """Load a transformers directory or an authors' ``.pth`` (transformers' call shape).

        ``config``: replaces ``config.json`` (or the config inferred from a ``.pth``);
        ``torch_dtype`` (or ``dtype``, transformers 5's name): cast after loading;
        ``backbone_only``: load only ``lxmert.*`` and initialise the heads (fine-tuning from a
        pre-trained checkpoint); ``config_overrides``: config fields to change, e.g.
        ``num_qa_labels=3129`` (with ``backbone_only=True`` when the checkpoint's head differs).
        Loading is strict; see :func:`lxmert_fast.checkpoint.load_pretrained`.
        """
        from lxmert_fast.checkpoint import load_pretrained

        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ValueError(f"torch_dtype={torch_dtype} and dtype={dtype}: pass one")
        return load_pretrained(
            cls,
            path,
            config=config,
            backbone_only=backbone_only,
            dtype=torch_dtype or dtype,
            **config_overrides,
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` that transformers' ``from_pretrained`` loads."""
        from lxmert_fast.checkpoint import save_pretrained

        save_pretrained(self, directory)


class LxmertModel(LxmertPreTrainedModel):
    """The LXMERT backbone: returns language output, vision output and the pooled [CLS].

    Inputs are checked at the boundary: ranks, widths, dtypes, batch sizes and mask lengths
    must agree, token ids must be in the vocabulary, and boxes must be normalised to
    [0, 1] (x1/w, y1/h, x2/w, y2/h) — pixel boxes silently ruin a pre-trained model, so out-of-range boxes
    raise. On the CPU the value checks name the values found; on a GPU (and under
    ``torch.compile``) they are device-side assertions, so they never stall the host. Set
    ``check_inputs = False`` to skip them (train.py checks each batch on the host instead).
    """

    def __init__(self, config: LxmertConfig | Any) -> None:
        super().__init__(config)
        self.embeddings = Embeddings(self.config)
        self.encoder = Encoder(self.config)
        self.pooler = Pooler(self.config)
        self.check_inputs = True
        self.init_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def _check(
        self,
        input_ids: Tensor | None,
        visual_feats: Tensor | None,
        visual_pos: Tensor | None,
        attention_mask: Tensor | None,
        visual_attention_mask: Tensor | None,
        token_type_ids: Tensor | None,
        inputs_embeds: Tensor | None,
    ) -> None:
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids / inputs_embeds: pass exactly one of them")
        if input_ids is not None:
            check_tensor("input_ids", input_ids, ndim=2, integer=True)
            batch, length = input_ids.shape
        else:
            check_tensor("inputs_embeds", inputs_embeds, ndim=3, last_dim=cfg.hidden_size, floating=True)
            batch, length = inputs_embeds.shape[:2]
        words = "input_ids" if input_ids is not None else "inputs_embeds"
        if length == 0:
            raise ValueError(
                f"{words}: expected at least one token per sentence ([CLS] ... [SEP]), got "
                f"{describe(input_ids if input_ids is not None else inputs_embeds)}"
            )
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids: sequence length {length} exceeds max_position_embeddings={cfg.max_position_embeddings}"
            )
        if visual_feats is None or visual_pos is None:
            raise ValueError(
                "visual_feats / visual_pos: both are required (RoI features and normalised boxes)"
            )
        check_tensor("visual_feats", visual_feats, ndim=3, last_dim=cfg.visual_feat_dim, floating=True)
        check_tensor("visual_pos", visual_pos, ndim=3, last_dim=cfg.visual_pos_dim, floating=True)
        if visual_feats.shape[0] != batch:
            raise ValueError(
                f"visual_feats: expected batch size {batch} (as the language input), got {describe(visual_feats)}"
            )
        num_boxes = visual_feats.shape[1]
        if num_boxes == 0:
            raise ValueError(
                f"visual_feats: expected at least one box per image (mask padding boxes with "
                f"visual_attention_mask instead), got {describe(visual_feats)}"
            )
        check_shape("visual_pos", visual_pos, (batch, num_boxes, cfg.visual_pos_dim))
        if attention_mask is not None:
            check_shape("attention_mask", attention_mask, (batch, length))
        if token_type_ids is not None:
            check_tensor("token_type_ids", token_type_ids, integer=True)
            check_shape("token_type_ids", token_type_ids, (batch, length))
        if visual_attention_mask is not None:
            check_shape("visual_attention_mask", visual_attention_mask, (batch, num_boxes))
        if self.check_inputs:
            self.check_input_values(input_ids, token_type_ids, visual_pos)

    def check_input_values(
        self, input_ids: Tensor | None, token_type_ids: Tensor | None, visual_pos: Tensor
    ) -> None:
        """The value checks of the inputs: ids in the vocabulary, token types in range, boxes in
        [0, 1] and not NaN. Host checks for CPU tensors, device assertions otherwise (see
        :func:`~lxmert_fast.checks.check_values_in_range`); train.py runs them on each CPU batch."""
        cfg = self.config
        if input_ids is not None:
            check_values_in_range(
                "input_ids",
                input_ids,
                0,
                cfg.vocab_size,
                high_inclusive=False,
                expected=f"expected ids in [0, {cfg.vocab_size})",
            )
        if token_type_ids is not None:
            check_values_in_range(
                "token_type_ids",
                token_type_ids,
                0,
                cfg.type_vocab_size,
                high_inclusive=False,
                expected=f"expected values in [0, {cfg.type_vocab_size})",
            )
        check_values_in_range(
            "visual_pos",
            visual_pos,
            -BOX_RANGE_TOLERANCE,
            1 + BOX_RANGE_TOLERANCE,
            expected="expected boxes normalised to [0, 1] (x1/w, y1/h, x2/w, y2/h); "
            "divide pixel boxes by (w, h, w, h) of the image",
        )

    def forward(
        self,
        input_ids: Tensor | None = None,
        visual_feats: Tensor | None = None,
        visual_pos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> LxmertModelOutput | tuple:
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = cfg.return_dict if return_dict is None else return_dict
        self._check(
            input_ids,
            visual_feats,
            visual_pos,
            attention_mask,
            visual_attention_mask,
            token_type_ids,
            inputs_embeds,
        )
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        device = visual_feats.device
        if token_type_ids is None:
            token_type_ids = torch.zeros(shape, dtype=torch.long, device=device)
        if attention_mask is None:
            attention_mask = torch.ones(shape, device=device)

        dtype = self.dtype
        lang = self.embeddings(input_ids, token_type_ids, inputs_embeds)
        lang_out, visual_out, lang_states, visual_states, lang_probs, visual_probs, cross_probs = (
            self.encoder(
                lang,
                mask_to_bias(attention_mask, dtype),
                visual_feats.to(dtype),
                visual_pos.to(dtype),
                mask_to_bias(visual_attention_mask, dtype),
                bool(output_attentions),
            )
        )
        out = LxmertModelOutput(
            language_output=lang_out,
            vision_output=visual_out,
            pooled_output=self.pooler(lang_out),
            language_hidden_states=lang_states if output_hidden_states else None,
            vision_hidden_states=visual_states if output_hidden_states else None,
            language_attentions=lang_probs if output_attentions else None,
            vision_attentions=visual_probs if output_attentions else None,
            cross_encoder_attentions=cross_probs if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()


def masked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over labels >= 0; negative labels are ignored.

    Accepts both ignore conventions (the authors' -1, transformers' -100). With no valid
    label the loss is 0, not NaN, and no device sync is needed to find out.
    """
    labels = labels.reshape(-1)
    valid = labels >= 0
    summed = F.cross_entropy(
        logits.reshape(labels.shape[0], -1), labels.masked_fill(~valid, -100), reduction="sum"
    )
    return summed / valid.sum().clamp(min=1)


def _resize_num_qa_labels(model: LxmertPreTrainedModel, num_labels: int | None) -> nn.Linear | None:
    """transformers' ``resize_num_qa_labels``: a new last answer layer of ``num_labels`` rows, the first
    ``min(old, new)`` copied, the rest initialised; ``config.num_qa_labels`` updated. Answer names
    (``config.id2label``) are kept when shrinking and dropped when growing (name the new ones with
    :func:`lxmert_fast.set_answer_labels`). Returns the layer (None for a model without QA head)."""
    head = getattr(model, "answer_head", None)
    if head is None:
        return None
    old = head.logit_fc[-1]
    if num_labels is None or num_labels == old.out_features:
        return old
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels: expected a positive integer, got {num_labels!r}")
    new = nn.Linear(old.in_features, num_labels).to(device=old.weight.device, dtype=old.weight.dtype)
    model.init_weights([new])
    keep = min(old.out_features, num_labels)
    with torch.no_grad():
        new.weight[:keep] = old.weight[:keep]
        new.bias[:keep] = old.bias[:keep]
    new.train(old.training)
    head.logit_fc[-1] = new
    config = model.config
    labels = config.id2label
    config.num_qa_labels = num_labels
    if labels is not None and num_labels < len(labels):
        config.set_answer_labels([labels[i] for i in range(num_labels)])
    elif labels is not None:
        config.id2label = config.label2id = None
    return new


def _backbone_check_inputs() -> property:
    """``check_inputs`` of a model with heads: the backbone's flag (``self.lxmert.check_inputs``),
    read and set through the heads model, so ``model.check_inputs = False`` skips every value check."""

    def get(self) -> bool:
        return self.lxmert.check_inputs

    def set_(self, value: bool) -> None:
        self.lxmert.check_inputs = bool(value)

    return property(get, set_, doc="Whether the inputs' values are checked (the backbone's flag).")


class LxmertForPreTraining(LxmertPreTrainedModel):
    """LXMERT with every pre-training head and the six losses of the paper.

    Losses (each returned in ``output.losses``, their sum in ``output.loss``):

    * ``mlm``: masked-LM cross-entropy over tokens with ``labels >= 0``;
    * ``matched``: image–sentence matching cross-entropy (``matched_label`` 1 = match);
    * ``obj`` / ``attr``: object / attribute cross-entropy on every vision token, each
      weighted by ``obj_labels[key][1]`` (the authors pass the detector confidence), mean
      over all tokens, times ``visual_loss_normalizer``;
    * ``feat``: smooth-L1 feature regression, mean over feature dims, weighted by
      ``obj_labels["feat"][1]`` (the mask of corrupted objects), mean, times the normaliser;
    * ``qa``: answer cross-entropy over ``ans >= 0`` (unmatched pairs carry -1).

    The authors scale visual losses by exactly 1/0.15; transformers' default
    ``visual_loss_normalizer`` is 6.67. Set it to ``1 / 0.15`` for the authors' numbers.

    Sparse heads: ``mlm_positions`` / ``feat_positions`` (int64 [K], flat indices ``b * T + t``
    into the B*T words / ``b * N + n`` into the B*N objects, -1 = padding; see
    :func:`lxmert_fast.pretraining.flat_positions`) make the MLM head (transform and tied decoder)
    and the feature decoder run on those K rows only, with the same losses as the dense heads
    (up to fp32 summation order), provided the positions list every word with ``labels >= 0`` and
    every object with a non-zero ``obj_labels["feat"][1]`` exactly once. With ``check_inputs`` on
    that is checked (on the host for CPU tensors, as device assertions otherwise). The shapes
    depend only on K, so a fixed K keeps a compiled / CUDA-graph step static.
    """

    check_inputs = _backbone_check_inputs()

    def __init__(self, config: LxmertConfig | Any) -> None:
        super().__init__(config)
        cfg = self.config
        self.lxmert = LxmertModel(cfg)
        self.cls = PreTrainingHeads(cfg)
        if cfg.task_obj_predict:
            self.obj_predict_head = VisualObjHead(cfg)
        if cfg.task_qa:
            self.answer_head = VisualAnswerHead(cfg, cfg.num_qa_labels)
        self.init_weights([m for name, m in self.named_children() if name != "lxmert"])

    def resize_num_qa_labels(self, num_labels: int | None) -> nn.Linear | None:
        return _resize_num_qa_labels(self, num_labels)

    resize_num_qa_labels.__doc__ = _resize_num_qa_labels.__doc__

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.lxmert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: Tensor | None = None,
        visual_feats: Tensor | None = None,
        visual_pos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        obj_labels: dict[str, tuple[Tensor, Tensor]] | None = None,
        matched_label: Tensor | None = None,
        ans: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        *,
        mlm_positions: Tensor | None = None,
        feat_positions: Tensor | None = None,
    ) -> LxmertForPreTrainingOutput | tuple:
        """transformers' arguments and outputs, plus the sparse-head positions (class docstring).

        ``prediction_logits`` is [B, T, vocab] without ``mlm_positions`` and [K, vocab] with
        them: row k holds the logits of word ``mlm_positions[k]`` (padding rows hold those of
        word 0 and mean nothing). Likewise the visual head's ``"feat"`` prediction is [K, feat_dim]
        with ``feat_positions``. ``feat_positions`` is unused without ``obj_labels``.
        """
        cfg = self.config
        return_dict = cfg.return_dict if return_dict is None else return_dict
        base = self.lxmert(
            input_ids,
            visual_feats,
            visual_pos,
            attention_mask,
            visual_attention_mask,
            token_type_ids,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
            return_dict=True,
        )
        grid = tuple(base.vision_output.shape[:2])
        self._check_labels(
            tuple(base.language_output.shape[:2]), grid, labels, matched_label, ans, obj_labels
        )
        if mlm_positions is not None:
            words, labelled = tuple(base.language_output.shape[:2]), None
            if labels is not None:
                labelled = check_shape("labels", labels, words) >= 0
            self._check_positions("mlm_positions", mlm_positions, words, labelled)
            if labels is not None:
                labels = gather_positions(labels, mlm_positions).masked_fill(mlm_positions < 0, -1)
        lang_scores = self.cls.predictions(base.language_output, mlm_positions)
        match_scores = self.cls.seq_relationship(base.pooled_output)
        # transformers returns this placeholder when the QA head is disabled; kept for identical tuples.
        answer_scores = self.answer_head(base.pooled_output) if cfg.task_qa else base.pooled_output[0][0]

        losses: dict[str, Tensor] = {}
        if labels is not None and cfg.task_mask_lm:
            losses["mlm"] = masked_cross_entropy(lang_scores, labels)
        if matched_label is not None and cfg.task_matched:
            losses["matched"] = masked_cross_entropy(match_scores, matched_label)
        if obj_labels is not None and cfg.task_obj_predict:
            predictions = self.obj_predict_head(base.vision_output, feat_positions)
            losses.update(self.visual_losses(predictions, obj_labels, feat_positions, grid))
        if ans is not None and cfg.task_qa:
            losses["qa"] = masked_cross_entropy(answer_scores, ans)
        any_labels = any(x is not None for x in (labels, obj_labels, matched_label, ans))
        loss = None
        if any_labels:
            loss = torch.zeros((), device=lang_scores.device, dtype=torch.float32)
            for value in losses.values():
                loss = loss + value

        out = LxmertForPreTrainingOutput(
            loss=loss,
            prediction_logits=lang_scores,
            cross_relationship_score=match_scores,
            question_answering_score=answer_scores,
            language_hidden_states=base.language_hidden_states,
            vision_hidden_states=base.vision_hidden_states,
            language_attentions=base.language_attentions,
            vision_attentions=base.vision_attentions,
            cross_encoder_attentions=base.cross_encoder_attentions,
            losses=losses if any_labels else None,
        )
        return out if return_dict else out.to_tuple()

    def _check_labels(
        self,
        words: tuple[int, int],
        grid: tuple[int, int],
        labels: Tensor | None,
        matched_label: Tensor | None,
        ans: Tensor | None,
        obj_labels: dict[str, tuple[Tensor, Tensor]] | None,
    ) -> None:
        """Label shapes against the batch: ``labels`` [B, T], ``matched_label`` and ``ans`` [B],
        ``obj_labels`` entries ([B, N], [B, N]), ``"feat"`` ([B, N, feat_dim], [B, N]). A loss
        flattens its labels, so a wrong shape would otherwise pair logits with the wrong rows.
        With ``check_inputs`` also the values (:meth:`check_label_values`)."""
        if labels is not None:
            check_tensor("labels", labels, integer=True)
            check_shape("labels", labels, words)
        for name, t in (("matched_label", matched_label), ("ans", ans)):
            if t is not None:
                check_tensor(name, t, integer=True)
                check_shape(name, t, words[:1])
        if obj_labels is not None:
            if not isinstance(obj_labels, dict):
                raise TypeError(
                    f"obj_labels: expected a dict {{key: (labels, weights)}}, got {type(obj_labels).__name__}"
                )
            for key, entry in obj_labels.items():
                if not isinstance(entry, tuple | list) or len(entry) != 2:
                    raise TypeError(
                        f"obj_labels[{key!r}]: expected a (labels, weights) pair, got {entry!r:.80}"
                    )
                label, weight = entry
                if key == "feat":
                    check_tensor("obj_labels['feat'][0]", label, floating=True)
                    check_shape("obj_labels['feat'][0]", label, (*grid, self.config.visual_feat_dim))
                else:
                    check_tensor(f"obj_labels[{key!r}][0]", label, integer=True)
                    check_shape(f"obj_labels[{key!r}][0]", label, grid)
                check_tensor(f"obj_labels[{key!r}][1]", weight)
                check_shape(f"obj_labels[{key!r}][1]", weight, grid)
        if self.lxmert.check_inputs:
            self.check_label_values(labels, matched_label, ans, obj_labels)

    def check_label_values(
        self,
        labels: Tensor | None = None,
        matched_label: Tensor | None = None,
        ans: Tensor | None = None,
        obj_labels: dict[str, tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        """Class ids of the enabled tasks below their number of classes (negative ids are ignored
        by the losses). Host checks for CPU tensors, device assertions otherwise; train.py runs
        them on each CPU batch."""
        cfg = self.config
        checks = []
        if cfg.task_mask_lm:
            checks.append(("labels", labels, cfg.vocab_size))
        if cfg.task_matched:
            checks.append(("matched_label", matched_label, 2))
        if cfg.task_qa:
            checks.append(("ans", ans, cfg.num_qa_labels))
        if cfg.task_obj_predict and obj_labels is not None:
            for key, classes in (("obj", cfg.num_object_labels), ("attr", cfg.num_attr_labels)):
                if key in visual_loss_specs(cfg) and key in obj_labels:
                    checks.append((f"obj_labels[{key!r}][0]", obj_labels[key][0], classes))
        for name, t, classes in checks:
            if t is not None:
                check_values_in_range(
                    name,
                    t,
                    float("-inf"),
                    classes,
                    high_inclusive=False,
                    expected=f"expected class ids in [0, {classes}) or negative (ignored)",
                )

    def _check_positions(
        self, name: str, positions: Tensor, grid: tuple[int, int], needed: Tensor | None
    ) -> None:
        """``positions``: 1-D integer; with ``check_inputs`` also every value in [-1, B*T) and
        every ``needed`` [B, T] row listed exactly once (else the sparse loss is not the dense one)."""
        check_tensor(name, positions, ndim=1, integer=True)
        if not self.lxmert.check_inputs:
            return
        rows = grid[0] * grid[1]
        check_values_in_range(
            name, positions, -1, rows - 1, expected=f"expected flat indices in [0, {rows}) or -1 (padding)"
        )
        if needed is None:
            return
        valid = positions >= 0
        hits = torch.zeros(rows, dtype=torch.int32, device=positions.device)
        hits.index_add_(0, positions.clamp(min=0), valid.to(torch.int32))
        covered = ~needed.reshape(-1) | (hits == 1)
        check_all(
            name,
            covered,
            "expected every labelled / weighted row listed exactly once",
            lambda: f", but {int((~covered).sum())} of {int(needed.sum())} are not",
        )

    def visual_losses(
        self,
        predictions: dict[str, Tensor],
        obj_labels: dict[str, tuple[Tensor, Tensor]],
        feat_positions: Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> dict[str, Tensor]:
        """The obj/attr/feat losses; with ``feat_positions``, ``predictions["feat"]`` holds the
        gathered rows [K, width] and ``grid`` is (B, N) of the vision tokens."""
        weight = self.config.visual_loss_normalizer
        losses = {}
        for key, width in visual_loss_specs(self.config).items():
            if key not in obj_labels:
                raise ValueError(
                    f"obj_labels: missing entry {key!r} (expected keys {list(visual_loss_specs(self.config))})"
                )
            label, mask_conf = obj_labels[key]
            scores = predictions[key].reshape(-1, width)
            if key == "feat" and feat_positions is not None:
                check_shape("obj_labels['feat'][0]", label, (*grid, width))
                check_shape("obj_labels['feat'][1]", mask_conf, grid)
                self._check_positions("feat_positions", feat_positions, grid, mask_conf != 0)
                target = gather_positions(label, feat_positions).to(scores.dtype)
                per_object = F.smooth_l1_loss(scores, target, reduction="none").mean(1)
                conf = gather_positions(mask_conf, feat_positions).masked_fill(feat_positions < 0, 0)
                # The dense loss is a mean over all B*N objects, unlisted ones contributing 0.
                losses[key] = (per_object * conf.to(per_object.dtype)).sum() / (grid[0] * grid[1]) * weight
                continue
            if key == "feat":
                check_shape("obj_labels['feat'][0]", label, (*predictions[key].shape[:2], width))
                per_object = F.smooth_l1_loss(
                    scores, label.reshape(-1, width).to(scores.dtype), reduction="none"
                ).mean(1)
            else:
                check_shape(f"obj_labels[{key!r}][0]", label, tuple(predictions[key].shape[:2]))
                target = label.reshape(-1).long()
                per_object = F.cross_entropy(scores, target.masked_fill(target < 0, -100), reduction="none")
            check_shape(f"obj_labels[{key!r}][1]", mask_conf, tuple(predictions[key].shape[:2]))
            losses[key] = (per_object * mask_conf.reshape(-1).to(per_object.dtype)).mean() * weight
        return losses


class LxmertForQuestionAnswering(LxmertPreTrainedModel):
    """LXMERT with a QA answer head (VQA, GQA; NLVR2 with a 2-way head on pairs).

    ``labels`` selects the loss: integer [B] class ids → cross-entropy over ``labels >= 0``
    (transformers); float [B, num_qa_labels] soft scores → binary cross-entropy with logits
    times the number of answers (the authors' VQA/GQA fine-tuning).
    """

    check_inputs = _backbone_check_inputs()

    def __init__(self, config: LxmertConfig | Any) -> None:
        super().__init__(config)
        self.lxmert = LxmertModel(self.config)
        self.answer_head = VisualAnswerHead(self.config, self.config.num_qa_labels)
        self.init_weights([self.answer_head])

    def resize_num_qa_labels(self, num_labels: int | None) -> nn.Linear | None:
        return _resize_num_qa_labels(self, num_labels)

    resize_num_qa_labels.__doc__ = _resize_num_qa_labels.__doc__

    def forward(
        self,
        input_ids: Tensor | None = None,
        visual_feats: Tensor | None = None,
        visual_pos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> LxmertForQuestionAnsweringOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        base = self.lxmert(
            input_ids,
            visual_feats,
            visual_pos,
            attention_mask,
            visual_attention_mask,
            token_type_ids,
            inputs_embeds,
            output_attentions,
            output_hidden_states,
            return_dict=True,
        )
        scores = self.answer_head(base.pooled_output)
        loss = None if labels is None else self.qa_loss(scores, labels)
        out = LxmertForQuestionAnsweringOutput(
            loss=loss,
            question_answering_score=scores,
            language_hidden_states=base.language_hidden_states,
            vision_hidden_states=base.vision_hidden_states,
            language_attentions=base.language_attentions,
            vision_attentions=base.vision_attentions,
            cross_encoder_attentions=base.cross_encoder_attentions,
        )
        return out if return_dict else out.to_tuple()

    def qa_loss(self, scores: Tensor, labels: Tensor) -> Tensor:
        if labels.is_floating_point():
            check_shape("labels", labels, tuple(scores.shape))
            return F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype)) * scores.shape[1]
        check_tensor("labels", labels, integer=True)
        if labels.numel() != scores.shape[0]:
            raise ValueError(
                f"labels: expected {scores.shape[0]} answer ids or soft scores [{scores.shape[0]}, "
                f"{scores.shape[1]}], got {describe(labels)}"
            )
        return masked_cross_entropy(scores, labels)
