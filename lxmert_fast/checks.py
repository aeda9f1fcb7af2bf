"""Argument checks shared by the ops and the models.

Every failure names the argument and says what was expected and what was given (shape,
dtype, device), so a wrong call stops at the boundary instead of failing deep in a kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    last_dim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    floating: bool = False,
    integer: bool = False,
) -> torch.Tensor:
    """Check one tensor argument; return it unchanged."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {describe(t)}")
    if last_dim is not None and t.shape[-1] != last_dim:
        raise ValueError(f"{name}: expected last dimension {last_dim}, got {describe(t)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {describe(t)}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer tensor (token ids), got {describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({allowed}), got {describe(t)}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None]) -> torch.Tensor:
    """Check ``t.shape`` against ``expected``, where ``None`` matches any size."""
    ok = t.dim() == len(expected) and all(
        e is None or e == s for e, s in zip(expected, t.shape, strict=False)
    )
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {describe(t)}")
    return t


def check_same_device(names_and_tensors: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    present = [(n, t) for n, t in names_and_tensors if t is not None]
    if not present:
        return
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} (as {first_name}), got {describe(t)}")


def check_probability(name: str, p: float) -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {p}")
    return float(p)


def check_all(name: str, ok: torch.Tensor, expected: str, failure: Callable[[], str]) -> None:
    """Check that every element of the bool tensor ``ok`` is true.

    A CPU tensor in eager mode is checked on the host: ``ValueError("{name}: {expected}{failure()}")``,
    ``failure`` describing what was found. A tensor on an accelerator, or any tensor while
    ``torch.compile`` traces, gets a device-side assertion (``torch._assert_async``) with
    ``expected`` as its message: reading the values back would stall the host on every forward
    and break CUDA-graph capture.
    """
    if ok.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(ok.all(), f"{name}: {expected}")
    elif ok.numel() and not bool(ok.all()):
        raise ValueError(f"{name}: {expected}{failure()}")


def check_values_in_range(
    name: str, t: torch.Tensor, low: float, high: float, *, expected: str, high_inclusive: bool = True
) -> None:
    """Check that every value of ``t`` lies in ``[low, high]`` (``[low, high)`` if not
    ``high_inclusive``); NaN is out of range. On the CPU the error names the values found
    (:func:`check_all`)."""

    def found() -> str:
        if t.is_floating_point() and bool(t.isnan().any()):
            return f", got {int(t.isnan().sum())} NaN values"
        return f", got values in [{t.min().item():.6g}, {t.max().item():.6g}]"

    below_high = t <= high if high_inclusive else t < high
    check_all(name, (t >= low) & below_high, expected, found)
