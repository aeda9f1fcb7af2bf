"""Philox4x32-10 counter-based random numbers in plain PyTorch.

The same generator as Random123 and cuRAND's ``curand_Philox4x32_10``. Because each output
depends only on (key, counter), the C++ op, the CUDA kernel and this reference draw the
same bits for the same (seed, offset), so they can be compared bit for bit.

Convention used throughout lxmert_fast: element ``i`` of a draw uses
``key = (lo32(seed), hi32(seed))`` and ``counter = (lo32(offset + i), hi32(offset + i), 0, 0)``
and receives the four 32-bit words of that block.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and int64 ``b`` < 2**32.

    The 64-bit product would overflow int64, so ``b`` is split into 16-bit halves.
    """
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    low_sum = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (low_sum >> 32), low_sum & _MASK32


def philox4x32(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of int64 ``counter`` [..., 4] (words < 2**32) under ``key``; int64 [..., 4]."""
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for r in range(ROUNDS):
        if r:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack((c0, c1, c2, c3), dim=-1)


def philox_bits(seed: int, offset: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Four random 32-bit words for each of ``n`` elements: int64 [n, 4], values in [0, 2**32)."""
    if n < 0:
        raise ValueError(f"n: expected a non-negative count, got {n}")
    if not 0 <= offset < 2**63 or not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed/offset: expected 64-bit values, got seed={seed}, offset={offset}")
    seed &= 0xFFFFFFFFFFFFFFFF
    index = torch.arange(n, dtype=torch.int64, device=device) + offset
    zeros = torch.zeros_like(index)
    counter = torch.stack((index & _MASK32, (index >> 32) & _MASK32, zeros, zeros), dim=-1)
    return philox4x32(counter, (seed & _MASK32, seed >> 32))


# Seeds the kernels draw per call: below 2**31, so a seed loaded as int64 or passed as int32 keys
# Philox the same way.
SEED_BOUND = 2**31 - 1


def draw_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed, int64 ``[1]`` on ``device``, from torch's generator of that device.

    Drawn on the device, never read back: no host sync, and inside a captured CUDA graph each
    replay draws anew from the generator's device-side state (a seed read on the host would be
    frozen into the graph). ``torch.manual_seed`` reproduces it, in eager and compiled runs alike.
    """
    return torch.randint(0, SEED_BOUND, (1,), dtype=torch.int64, device=device)


def check_seed(seed: int | torch.Tensor | None, bits: int = 63) -> None:
    """An int ``seed`` must key Philox in ``bits`` bits: ``0 <= seed < 2**bits`` (the kernels load
    as many). A tensor seed is not read on the host (no sync); None means "draw one"."""
    if isinstance(seed, int) and not 0 <= seed < 2**bits:
        raise ValueError(f"seed: expected 0 <= seed < 2**{bits}, got {seed}")


def seed_tensor(seed: int | torch.Tensor, device: torch.device, bits: int = 63) -> torch.Tensor:
    """``seed`` as the int64 ``[1]`` device tensor the kernels load (tests pass plain ints), after
    :func:`check_seed` with the kernel's key width ``bits``."""
    check_seed(seed, bits)
    if isinstance(seed, torch.Tensor):
        return seed.to(device=device, dtype=torch.int64).reshape(1)
    return torch.tensor([seed], dtype=torch.int64, device=device)
