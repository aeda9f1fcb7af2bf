"""Pieces of the LXMERT pre-training loop that do not depend on DeepSpeed (``train.py`` wires them).

* :data:`PRESETS` — model sizes (``paper`` = 9/5/5 x 768);
* :func:`build_config` — a :class:`~lxmert_fast.LxmertConfig` for the data and the task switches;
* :func:`mask_objects` — masked-object corruption on the device (``ops.roi_feature_mask``) and the
  visual targets;
* :func:`head_positions` — the rows the sparse MLM and feature heads decode, computed on the host
  (:func:`selected_objects`, :func:`flat_positions`, :func:`position_budget`);
* :func:`pretraining_step_inputs` / :func:`weighted_loss` / :func:`accuracy_counts`;
* :class:`BertAdam` — the authors' Adam without bias correction; :func:`build_optimizer` (fused on
  CUDA); :func:`linear_warmup_decay`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lxmert_fast import ops, reference
from lxmert_fast.checks import describe
from lxmert_fast.config import LxmertConfig
from lxmert_fast.modeling import LxmertForPreTraining, gather_positions
from lxmert_fast.philox import philox_bits

Tensor = torch.Tensor

# ``small`` departs from BERT's init and dropout, measured on the synthetic default (held-out
# matching after 1200 steps): with std 0.02 (tuned for width 768) the image-text interaction
# matching needs is so weak at width 128 that matching sat at chance (0.50) for thousands of
# steps; std 0.05, about the same fan-in-relative scale, reached 0.59-0.64 (0.1 slowed masked
# LM); dropping dropout as well reached 0.71 already at step 600 and 0.80 at step 1200. The
# paper preset keeps BERT's values.
PRESETS: dict[str, dict[str, float]] = {
    "paper": dict(
        hidden_size=768, num_attention_heads=12, intermediate_size=3072, l_layers=9, x_layers=5, r_layers=5
    ),
    "small": dict(
        hidden_size=128,
        num_attention_heads=4,
        intermediate_size=256,
        l_layers=2,
        x_layers=2,
        r_layers=1,
        initializer_range=0.05,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
    "tiny": dict(
        hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=1, x_layers=1, r_layers=1
    ),
}
TASK_LOSSES = ("mlm", "matched", "obj", "attr", "feat", "qa")
# The authors sum every loss with weight 1 (visual losses carry 1/0.15 inside the model).
AUTHORS_LOSS_WEIGHTS = dict.fromkeys(TASK_LOSSES, 1.0)


def build_config(
    preset: str,
    vocab_size: int,
    visual_feat_dim: int,
    num_answers: int,
    tasks: dict[str, bool],
    visual_losses: Iterable[str] = ("obj", "attr", "feat"),
    num_object_labels: int = 1600,
    num_attr_labels: int = 400,
    obj_mask_rate: float = 0.15,
) -> LxmertConfig:
    """Config for ``preset`` with the task switches ``tasks`` (keys mlm, matched, obj, qa)."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    visual_losses = set(visual_losses)
    unknown = visual_losses - {"obj", "attr", "feat"}
    if unknown:
        raise ValueError(f"visual_losses: unknown {sorted(unknown)}; expected a subset of obj,attr,feat")
    return LxmertConfig(
        vocab_size=vocab_size,
        visual_feat_dim=visual_feat_dim,
        num_qa_labels=max(num_answers, 1),
        num_object_labels=num_object_labels,
        num_attr_labels=num_attr_labels,
        task_mask_lm=tasks["mlm"],
        task_matched=tasks["matched"],
        task_obj_predict=tasks["obj"] and bool(visual_losses),
        task_qa=tasks["qa"],
        visual_obj_loss="obj" in visual_losses,
        visual_attr_loss="attr" in visual_losses,
        visual_feat_loss="feat" in visual_losses,
        # The authors scale visual losses by exactly 1 / mask rate (transformers rounds to 6.67).
        visual_loss_normalizer=1.0 / obj_mask_rate,
        **PRESETS[preset],
    )


def mask_objects(
    batch: dict[str, Tensor], seed: int, offset: int, rate: float, obj_loss_on: str
) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]], Tensor]:
    """Corrupt the RoI features on their device and build the visual targets.

    Returns (corrupted features, ``obj_labels`` for the model, selected-object mask [B, N]).
    Feature regression always counts only selected objects; ``obj_loss_on="all"`` weights the
    object/attribute cross-entropy by the detector confidence on every object (the authors'
    code), ``"masked"`` only on selected objects. The selection is a function of
    (seed, offset, B, N, rate) alone: :func:`head_positions` computes it on the host beforehand.
    """
    if obj_loss_on not in ("all", "masked"):
        raise ValueError(f"obj_loss_on: expected 'all' or 'masked', got {obj_loss_on!r}")
    feats = batch["visual_feats"]
    corrupted, action = ops.roi_feature_mask(feats.contiguous(), seed, offset, p_select=rate)
    selected = (action > 0) & (batch["visual_mask"] > 0)
    sel = selected.to(feats.dtype)
    scope = sel if obj_loss_on == "masked" else batch["visual_mask"]
    obj_labels = {
        "obj": (batch["obj_ids"], batch["obj_conf"] * scope),
        "attr": (batch["attr_ids"], batch["attr_conf"] * scope),
        "feat": (feats, sel),
    }
    return corrupted, obj_labels, selected


# Sparse heads: the MLM head and the feature decoder run on a fixed number K of gathered rows
# instead of every word / object (about 15 % of them carry a loss).
POSITION_MULTIPLE = 8
POSITION_SIGMAS = 6.0


def position_budget(candidates: int, rate: float) -> int:
    """The row budget of a sparse head for ``candidates`` rows each chosen with probability
    ``rate``: the mean of that binomial count plus 6 standard deviations, rounded up to a
    multiple of 8 (at most ``candidates`` rounded up). A batch exceeds it with probability
    about 1e-9 (normal tail at 6 sigma); :func:`flat_positions` then grows K for that batch
    rather than drop a row. Depends only on the batch shape and the rate: one K for a run."""
    mean = candidates * rate
    sigma = math.sqrt(candidates * rate * (1.0 - rate))
    budget = min(math.ceil(mean + POSITION_SIGMAS * sigma), candidates)
    return -(-budget // POSITION_MULTIPLE) * POSITION_MULTIPLE


def flat_positions(mask: Tensor, budget: int) -> Tensor:
    """Flat indices ``b * T + t`` of the True entries of a CPU bool ``mask`` [B, T], in order,
    padded with -1 to K = max(budget, count rounded up to a multiple of 8): int64 [K].

    Computed on the host before the batch goes to the device, so the model sees a shape fixed
    by ``budget``; a count above it grows K (a new shape in that rare batch), never drops a row,
    so the sparse losses stay the dense ones."""
    if mask.device.type != "cpu" or mask.dtype != torch.bool:
        raise ValueError(
            f"mask: expected a CPU bool tensor (positions are made on the host), got {describe(mask)}"
        )
    index = mask.reshape(-1).nonzero().squeeze(1)
    count = index.numel()
    positions = torch.full((max(budget, -(-count // POSITION_MULTIPLE) * POSITION_MULTIPLE),), -1)
    positions[:count] = index
    return positions


def selected_objects(seed: int, offset: int, batch: int, num_boxes: int, rate: float) -> Tensor:
    """The objects ``ops.roi_feature_mask(features [batch, num_boxes, D], seed, offset, p_select=rate)``
    selects (its ``action > 0``), computed on the host: bool [batch, num_boxes]. The op decides
    from its Philox words at (seed, offset) alone, never from the features, so this is the
    reference rule (:func:`lxmert_fast.reference.roi_feature_actions`) over the same words."""
    bits = philox_bits(seed, offset, batch * num_boxes).view(batch, num_boxes, 4)
    return reference.roi_feature_actions(bits, p_select=rate) > 0


def head_positions(
    batch: dict[str, Tensor],
    config: LxmertConfig,
    word_rate: float,
    obj_seed: int,
    obj_offset: int,
    obj_rate: float,
) -> dict[str, Tensor]:
    """The sparse heads' positions for a CPU ``batch``, before it goes to the device.

    ``mlm_positions``: the words with ``mlm_labels >= 0``; ``feat_positions`` (only when the
    model regresses features): the real objects :func:`mask_objects` will select with
    (``obj_seed``, ``obj_offset``, ``obj_rate``). Budgets: :func:`position_budget` of B*T at
    ``word_rate`` and of B*N at ``obj_rate``. :func:`model_inputs` passes them to the model."""
    labels = batch["mlm_labels"]
    out = {"mlm_positions": flat_positions(labels >= 0, position_budget(labels.numel(), word_rate))}
    if config.task_obj_predict and config.visual_feat_loss:
        real = batch["visual_mask"] > 0
        selected = selected_objects(obj_seed, obj_offset, *real.shape, obj_rate) & real
        out["feat_positions"] = flat_positions(selected, position_budget(real.numel(), obj_rate))
    return out


def model_inputs(
    batch: dict[str, Tensor], visual_feats: Tensor, obj_labels: dict | None, use_visual_mask: bool
) -> dict[str, Any]:
    """The model's keyword arguments; the sparse heads' positions when ``batch`` carries them
    (:func:`head_positions`), else dense heads."""
    return {
        "input_ids": batch["input_ids"],
        "visual_feats": visual_feats,
        "visual_pos": batch["visual_pos"],
        "attention_mask": batch["attention_mask"],
        "visual_attention_mask": batch["visual_mask"] if use_visual_mask else None,
        "token_type_ids": batch["token_type_ids"],
        "labels": batch["mlm_labels"],
        "obj_labels": obj_labels,
        "matched_label": batch["matched_label"],
        "ans": batch["qa_label"],
        "mlm_positions": batch.get("mlm_positions"),
        "feat_positions": batch.get("feat_positions"),
    }


def check_batch(model: LxmertForPreTraining, batch: dict[str, Tensor]) -> None:
    """The model's value checks of its inputs and labels (ids in the vocabulary, boxes in [0, 1] and
    not NaN, class ids below their counts) on a CPU ``batch`` of :class:`PretrainDataset`, before it
    goes to the device: host checks that cost no device sync, for a model run with
    ``check_inputs = False``."""
    model.lxmert.check_input_values(batch["input_ids"], batch["token_type_ids"], batch["visual_pos"])
    obj_labels = {key: (batch[f"{key}_ids"], batch[f"{key}_conf"]) for key in ("obj", "attr")}
    model.check_label_values(batch["mlm_labels"], batch["matched_label"], batch["qa_label"], obj_labels)


def weighted_loss(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    total = None
    for key, value in losses.items():
        term = value * weights.get(key, 1.0)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no task produced a loss: enable at least one of --task_mlm/matched/obj/qa")
    return total


def accuracy_counts(
    out: Any, batch: dict[str, Tensor], selected: Tensor | None, visual: dict[str, Tensor] | None
) -> dict[str, Tensor]:
    """(correct, total) per task as float tensors [2], summable across steps and ranks.

    mlm over labelled tokens (the gathered rows when ``batch`` has ``mlm_positions``: then
    ``out.prediction_logits`` is [K, vocab]); matched over all pairs; obj/attr over selected
    (masked) objects (``visual``: the visual head's logits, see :class:`VisualLogits`); qa over
    pairs with an answer label."""
    counts = {}

    def add(name: str, pred: Tensor, target: Tensor, valid: Tensor) -> None:
        counts[name] = torch.stack([((pred == target) & valid).sum(), valid.sum()]).float()

    labels, positions = batch["mlm_labels"], batch.get("mlm_positions")
    if positions is not None:
        labels = gather_positions(labels, positions).masked_fill(positions < 0, -1)
    if out.prediction_logits is not None:
        add("mlm", out.prediction_logits.argmax(-1), labels, labels >= 0)
    add(
        "matched",
        out.cross_relationship_score.argmax(-1),
        batch["matched_label"],
        batch["matched_label"] >= 0,
    )
    logits = out.question_answering_score
    if logits.dim() == 2:
        add("qa", logits.argmax(-1), batch["qa_label"], batch["qa_label"] >= 0)
    if visual and selected is not None:
        for key in ("obj", "attr"):
            if key in visual:
                target = batch[f"{key}_ids"]
                add(key, visual[key].argmax(-1), target, selected & (target >= 0))
    return counts


class VisualLogits:
    """Captures the object/attribute logits of ``model.obj_predict_head`` (the model returns only
    the losses) with a forward hook, for accuracies. ``.logits`` holds the latest call's dict."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.logits: dict[str, Tensor] | None = None
        head = getattr(model, "obj_predict_head", None)
        self.handle = None if head is None else head.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, output: dict[str, Tensor]) -> None:
        self.logits = {k: v.detach() for k, v in output.items() if k != "feat"}

    def pop(self) -> dict[str, Tensor] | None:
        logits, self.logits = self.logits, None
        return logits


class BertAdam(torch.optim.Optimizer):
    """The authors' optimiser (pytorch-pretrained-bert ``BertAdam``): Adam WITHOUT bias correction,
    decoupled weight decay added to the update. The learning-rate schedule comes from outside.
    (The original also clips each parameter's gradient norm separately; clipping here is the
    global norm from ``gradient_clipping`` in ds.json.)

    ``foreach=True`` runs each group's update as ``torch._foreach_*`` ops over all its parameters
    (a handful of multi-tensor launches per step on CUDA instead of about eight kernels per
    parameter); ``foreach=False`` is the per-parameter loop, the reference it is tested against.
    Both keep the same state (``exp_avg``, ``exp_avg_sq`` per parameter), so checkpoints of either
    resume in the other. ``foreach`` is an attribute, not a group default: the groups a checkpoint
    saves stay as before, and loading one does not switch the implementation.
    The multi-tensor path holds two parameter-sized temporaries per group for a moment.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        foreach: bool = True,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.foreach = foreach

    def _moments(self, p: Tensor) -> tuple[Tensor, Tensor]:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        return state["exp_avg"], state["exp_avg_sq"]

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._step_foreach if self.foreach else self._step_loop)(group, params)
        return loss

    def _step_loop(self, group: dict[str, Any], params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        for p in params:
            m, v = self._moments(p)
            m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            update = m / (v.sqrt() + group["eps"])
            if group["weight_decay"]:
                update.add_(p, alpha=group["weight_decay"])
            p.add_(update, alpha=-group["lr"])

    def _step_foreach(self, group: dict[str, Any], params: list[Tensor]) -> None:
        # The loop's operations in the loop's order, so on the CPU (where foreach ops run tensor
        # by tensor) the two agree bit for bit; CUDA kernels may differ by fp32 rounding.
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        ms, vs = zip(*(self._moments(p) for p in params), strict=True)
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, grads, alpha=1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(ms, denom)
        del denom
        if group["weight_decay"]:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
        torch._foreach_add_(params, updates, alpha=-group["lr"])


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights (BERT / the authors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(
            p
        )
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


OPTIMIZERS = ("adamw", "bert_adam")


def build_optimizer(
    name: str,
    groups: Iterable,
    lr: float,
    eps: float,
    device: torch.device,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """The training optimiser: ``adamw`` (torch's AdamW) or ``bert_adam`` (:class:`BertAdam`).

    ``device`` is where the step will run (DeepSpeed moves the parameters there after this call).
    ``fused``: True for the fast path, False for the per-parameter loop (the reference), None for
    this device's default:

    * ``adamw`` on CUDA: torch's fused kernel (``fused=True``: the whole update in one kernel per
      chunk of tensors). On the CPU the default is torch's multi-tensor path (``foreach=True``),
      which there runs the loop's ops tensor by tensor and reproduces it bit for bit, so CPU runs
      match the earlier ones (which used the loop); torch 2.13 also fuses on the CPU (about 2x
      faster again for the small preset, but about one ulp off the loop) — ``fused=True`` asks for it.
    * ``bert_adam``: no single-kernel version exists; the fast path (True or None) is the
      multi-tensor one.

    Loading a state dict (a resumed checkpoint) keeps the implementation chosen here: torch's
    ``load_state_dict`` would otherwise take ``fused``/``foreach`` from the saved groups, and a
    checkpoint from before this function would silently turn the fused kernel off.
    """
    if name == "bert_adam":
        return BertAdam(groups, lr=lr, eps=eps, foreach=fused is not False)
    if name != "adamw":
        raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if fused is None:
        fused = torch.device(device).type == "cuda"
        foreach = not fused
    else:
        foreach = False
    optimizer = torch.optim.AdamW(groups, lr=lr, eps=eps, fused=fused, foreach=foreach)

    def keep_implementation(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            group["fused"], group["foreach"] = fused, foreach
            for p in group["params"]:
                step = opt.state.get(p, {}).get("step")
                if torch.is_tensor(step):
                    # Where a fresh AdamW keeps its step count: next to the parameter when fused,
                    # on the CPU otherwise.
                    opt.state[p]["step"] = step.to(device=p.device if fused else "cpu", dtype=torch.float32)

    optimizer.register_load_state_dict_post_hook(keep_implementation)
    return optimizer


def linear_warmup_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor: linear 0→1 over ``warmup_steps``, then linear to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def qa_weight(schedule: str, step: int, total_steps: int) -> float:
    """``constant``: 1 throughout (the authors' released code). ``authors``: the paper's schedule,
    QA off for the first half of training and weight 2 in the second half."""
    if schedule == "constant":
        return 1.0
    if schedule == "authors":
        return 0.0 if step < math.ceil(total_steps / 2) else 2.0
    raise ValueError(f"qa_schedule: expected 'constant' or 'authors', got {schedule!r}")
