"""The timed training step of the step benchmarks (bench_pretrain_step.py, bench_finetune_step.py,
profile_step.py): forward under autocast, the loss, backward, AdamW, eager or compiled."""

from __future__ import annotations

from collections.abc import Callable

import torch


def training_step(
    model: torch.nn.Module,
    inputs: dict,
    loss_of: Callable[[object], torch.Tensor],
    lr: float,
    size: str,
    mode: str,
    device: str,
) -> Callable[[], None]:
    """``step()``: ``loss_of(model(**inputs))`` (bf16 autocast for the paper configs on CUDA),
    backward, an AdamW step (fused on CUDA) and the gradients cleared. ``mode`` compiled: the model
    under ``torch.compile`` (``mode="reduce-overhead"``, CUDA graphs, on CUDA), dynamo reset first."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=device == "cuda")
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda" and size.startswith("paper"))
    forward = model
    if mode == "compiled":
        torch._dynamo.reset()
        forward = torch.compile(model, mode="reduce-overhead" if device == "cuda" else None)

    def step() -> None:
        with autocast:
            loss = loss_of(forward(**inputs))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
