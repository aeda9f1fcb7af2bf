"""The pre-training data's randomness: Philox4x32-10 words keyed on ``(seed, epoch, index, slot)``.

Every random choice of an item (the mismatched sentence, word masking, the sampled answer) reads
words of one Philox block whose counter names what it is for, so an item is a pure function of
``(seed, epoch, index)``: the same whatever the order items are built in, the batch they fall in, the
number of loader workers or a resume — and a whole batch is drawn at once with numpy, with the very
bits the per-sample path (:class:`~lxmert_fast.data.pretrain.PretrainDataset`, kept as the oracle)
draws one item at a time.

Block of item ``index`` for ``slot``: key ``(lo32(seed), hi32(seed))``, counter
``(lo32(index), hi32(index), epoch, slot)``, the same generator as :mod:`lxmert_fast.philox` (there in
torch for the device ops). Slots:

* ``p`` (0 <= p < max_seq_len): word position ``p``: word 0 selects it (``< rate``), word 1 picks the
  action (``< 0.8`` [MASK], ``< 0.9`` a random id, else unchanged), word 2 the random id;
* :data:`SAMPLE_SLOT`: word 0 decides the mismatch (``< mismatch_rate``), word 1 samples the answer;
* :data:`OTHER_SLOT` ``+ t`` (t < 4): the 16 candidates for the mismatched sentence, tried in order
  ``4 t + word`` until one shows another image.

A word ``w`` is the uniform ``w / 2**32`` and the integer below ``n`` is ``(w * n) >> 32``.
"""

from __future__ import annotations

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
SAMPLE_SLOT = 0xFFFFFFFF
OTHER_SLOT = 0xFFFFFFF0
OTHER_TRIES = 16


def philox4x32(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of ``counter`` [..., 4] (uint64 words < 2**32) under ``key``; uint64 [..., 4]."""
    counter = np.asarray(counter, np.uint64)
    c0, c1, c2, c3 = (counter[..., i] for i in range(4))
    k0, k1 = key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF
    for r in range(_ROUNDS):
        if r:
            k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
        # Both factors are below 2**32: the product fits uint64 exactly.
        p0, p1 = c0 * _M0, c2 * _M1
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0),
            p1 & _MASK32,
            (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1),
            p0 & _MASK32,
        )
    return np.stack((c0, c1, c2, c3), axis=-1)


def draws(seed: int, epoch: int, index: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """The four words of each item's block for each slot: uint64 [len(index), len(slots), 4]."""
    if not 0 <= epoch < 2**32:
        raise ValueError(f"epoch: expected 0 <= epoch < 2**32, got {epoch}")
    index = np.asarray(index, np.int64).astype(np.uint64)[:, None]
    slots = np.asarray(slots, np.uint64)[None, :]
    shape = np.broadcast_shapes(index.shape, slots.shape)
    counter = np.empty((*shape, 4), np.uint64)
    counter[..., 0] = index & _MASK32
    counter[..., 1] = index >> np.uint64(32)
    counter[..., 2] = epoch
    counter[..., 3] = slots
    seed &= 0xFFFFFFFFFFFFFFFF
    return philox4x32(counter, (seed & 0xFFFFFFFF, seed >> 32))


def word_draws(seed: int, epoch: int, index: np.ndarray, length: int) -> np.ndarray:
    """Words of positions ``0 .. length-1``: uint64 [len(index), length, 4]."""
    return draws(seed, epoch, index, np.arange(length))


def sample_draws(seed: int, epoch: int, index: np.ndarray) -> np.ndarray:
    """The item's own block (mismatch, answer): uint64 [len(index), 4]."""
    return draws(seed, epoch, index, np.array([SAMPLE_SLOT]))[:, 0]


def other_draws(seed: int, epoch: int, index: np.ndarray) -> np.ndarray:
    """The mismatch candidates' words, in the order they are tried: uint64 [len(index), 16]."""
    blocks = draws(seed, epoch, index, OTHER_SLOT + np.arange(OTHER_TRIES // 4))
    return blocks.reshape(len(blocks), OTHER_TRIES)


def uniform(words: np.ndarray) -> np.ndarray:
    """``words / 2**32``: float64 in [0, 1), exact."""
    return np.asarray(words, np.uint64).astype(np.float64) * 2.0**-32


def below(words: np.ndarray, n: int) -> np.ndarray:
    """An integer in ``[0, n)`` from each word: ``(w * n) >> 32`` (int64; ``n`` < 2**32)."""
    if not 0 < n < 2**32:
        raise ValueError(f"n: expected 0 < n < 2**32, got {n}")
    return ((np.asarray(words, np.uint64) * np.uint64(n)) >> np.uint64(32)).astype(np.int64)


def pick_answer(scores: np.ndarray, word: np.ndarray) -> np.ndarray:
    """Which answer to take, in proportion to its score: ``scores`` float32 [B, K] (zero padded),
    ``word`` uint64 [B]; returns int64 [B], the first ``k`` whose running sum exceeds
    ``uniform(word) * total`` (-1 where the total is not positive). Sums run in float64 left to right,
    so a row gives the same answer alone or in any batch."""
    cdf = np.cumsum(np.asarray(scores, np.float32).astype(np.float64), axis=1)
    if cdf.shape[1] == 0:
        return np.full(len(cdf), -1, np.int64)
    total = cdf[:, -1]
    target = uniform(word) * total
    # A target rounded up to the total still takes the last answer that adds to it, never padding.
    last = np.argmax(cdf >= total[:, None], axis=1)
    k = np.minimum((cdf <= target[:, None]).sum(axis=1), last)
    return np.where(total > 0, k, -1).astype(np.int64)
