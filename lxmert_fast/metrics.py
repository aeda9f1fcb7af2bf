"""Training metrics without host syncs, and the FLOP accounting behind TFLOP/s and % of peak.

* :class:`RunningMetrics` sums losses and accuracy counts on their device; only :meth:`read`,
  called once per logging window, copies them to the host. It also keeps, on the device, the
  first step at which each loss term was NaN or Inf (:meth:`first_nonfinite`).
* :func:`training_flops` counts the FLOPs of one forward and backward with
  ``torch.utils.flop_counter`` on the ``meta`` device (shapes only: no memory, no compute).
* :func:`bf16_peak_flops` is the dense bf16 peak of known GPUs, the denominator of % of peak.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

Tensor = torch.Tensor

# Dense (not sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s; matched
# against torch.cuda.get_device_name in this order (H100 PCIe before the plain H100, the SXM part).
BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)


class RunningMetrics:
    """Sums of per-task losses (weighted) and ``(correct, total)`` counts over a logging window.

    ``add_losses`` and ``add_counts`` only add device tensors; ``read`` performs the window's one
    host copy and returns the mean losses (sum of weights as denominator) and accuracies, then
    starts a new window.
    """

    def __init__(self) -> None:
        self._losses: dict[str, Tensor] = {}
        self._counts: dict[str, Tensor] = {}
        self._weight = 0.0
        self._first_nonfinite: dict[str, Tensor] = {}

    def add_losses(self, losses: Mapping[str, Tensor], weight: float = 1.0, step: int | None = None) -> None:
        """Add the window's loss terms; with ``step``, also remember (on the device, no host read)
        the first ``step`` at which a term was NaN or Inf."""
        for key, value in losses.items():
            term = value.detach().float() * weight
            self._losses[key] = term if key not in self._losses else self._losses[key] + term
            if step is not None:
                first = self._first_nonfinite.get(key)
                if first is None:
                    first = torch.full((), -1, dtype=torch.int64, device=term.device)
                self._first_nonfinite[key] = torch.where(~torch.isfinite(term) & (first < 0), step, first)
        self._weight += weight

    def first_nonfinite(self) -> dict[str, int]:
        """``{term: first step it was NaN/Inf, or -1}`` over the steps added with ``step`` since the
        last :meth:`read` (one host copy). Kept until :meth:`read` starts a new window."""
        keys = sorted(self._first_nonfinite)
        if not keys:
            return {}
        steps = torch.stack([self._first_nonfinite[k] for k in keys]).cpu()
        return {k: int(v) for k, v in zip(keys, steps, strict=True)}

    def add_counts(self, counts: Mapping[str, Tensor]) -> None:
        for key, value in counts.items():
            self._counts[key] = value if key not in self._counts else self._counts[key] + value

    def read(self, all_ranks: bool = False, own: dict[str, float] | None = None) -> dict[str, float]:
        """``{task: mean loss, task_acc: accuracy}`` of the window (one host copy), then reset.

        ``all_ranks``: over every rank of the process group (one all-reduce, every rank calls it):
        the losses are averaged over ranks — each rank's window holds the same number of examples
        (fixed micro batches), so this is the mean over examples — and the counts summed. ``own``:
        filled with this rank's values alone (one more host copy)."""
        keys = sorted(self._losses)
        count_keys = sorted(self._counts)
        losses = [self._losses[k] for k in keys]
        counts = [self._counts[k] for k in count_keys]
        if own is not None:
            own.update(self._record(keys, losses, count_keys, counts))
        if all_ranks and (losses or counts):
            import torch.distributed as dist

            device = (losses or counts)[0].device
            parts = ([torch.stack(losses).double()] if losses else []) + (
                [torch.stack(counts).double().flatten()] if counts else []
            )
            flat = torch.cat([p.to(device) for p in parts])
            dist.all_reduce(flat)
            world = dist.get_world_size()
            losses = list(flat[: len(keys)] / world)
            counts = list(flat[len(keys) :].view(len(count_keys), -1)) if counts else []
        record = self._record(keys, losses, count_keys, counts)
        self._losses, self._counts, self._weight, self._first_nonfinite = {}, {}, 0.0, {}
        return record

    def _record(
        self, keys: list[str], losses: list[Tensor], count_keys: list[str], counts: list[Tensor]
    ) -> dict[str, float]:
        record: dict[str, float] = {}
        if keys:
            values = torch.stack(losses).cpu() / max(self._weight, 1e-12)
            record.update((k, round(float(v), 6)) for k, v in zip(keys, values, strict=True))
        record.update(
            (f"{k}_acc", v) for k, v in accuracies(dict(zip(count_keys, counts, strict=True))).items()
        )
        return record


def accuracies(counts: Mapping[str, Tensor]) -> dict[str, float]:
    """``{task: correct / total}`` of ``(correct, total)`` count pairs in one host copy; tasks with
    no example left out."""
    keys = sorted(counts)
    if not keys:
        return {}
    stacked = torch.stack([counts[k] for k in keys]).cpu()
    return {k: round(float(c[0] / c[1]), 5) for k, c in zip(keys, stacked, strict=True) if c[1] > 0}


def _to_meta(value: Any) -> Any:
    if isinstance(value, Tensor):
        # Detached: a real input that requires grad (train.py's ZeRO-3 inputs) must not receive
        # the meta backward ("Cannot copy out of meta tensor").
        return value.detach().to("meta").requires_grad_(value.requires_grad)
    if isinstance(value, Mapping):
        return {k: _to_meta(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_to_meta(v) for v in value)
    return value


def training_flops(
    build_model: Callable[[], torch.nn.Module], inputs: Mapping[str, Any], loss_of: Callable[[Any], Tensor]
) -> int:
    """FLOPs of one forward (``build_model()(**inputs)``), ``loss_of(output)`` and its backward.

    The model is built on the ``meta`` device and the inputs are moved there, so counting the
    paper model costs neither memory nor compute. Divide by the batch size for per-sample FLOPs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model()
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        loss_of(model(**_to_meta(dict(inputs)))).backward()
    return int(counter.get_total_flops())


def bf16_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` if it is a GPU this table knows, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in name), None)
