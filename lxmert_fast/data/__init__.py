"""Data for LXMERT pre-training: the authors' formats, a memory-mapped feature store, a synthetic set.

* :mod:`~lxmert_fast.data.tsv` — feature TSV reader/writer;
* :mod:`~lxmert_fast.data.store` — TSV → memory-mapped store (``python -m lxmert_fast.data.convert``);
* :mod:`~lxmert_fast.data.answers` — the QA answer table and answer normalisation;
* :mod:`~lxmert_fast.data.tokenization` — WordPiece from a ``vocab.txt``;
* :mod:`~lxmert_fast.data.pretrain` — pre-training JSON, the Dataset, a resumable sampler;
* :mod:`~lxmert_fast.data.corpus` — pre-tokenised corpus store (``python -m lxmert_fast.data.convert_corpus``);
* :mod:`~lxmert_fast.data.batches` — whole batches gathered from the stores, a device prefetcher;
* :mod:`~lxmert_fast.data.synthetic` — a small learnable dataset in the same formats.
"""

from lxmert_fast.data.answers import AnswerTable, normalize_answer
from lxmert_fast.data.batches import DevicePrefetcher, PretrainBatches, batch_loader
from lxmert_fast.data.corpus import Corpus, CorpusMismatchError, build_corpus, ensure_corpus, is_corpus
from lxmert_fast.data.pretrain import (
    EpochBatchSampler,
    Example,
    PretrainDataset,
    build_examples,
    load_pretrain_json,
    mask_words,
)
from lxmert_fast.data.store import FeatureStore, convert_tsv_to_store, is_store
from lxmert_fast.data.tokenization import WordPieceTokenizer
from lxmert_fast.data.tsv import FeatureFileError, read_feature_tsv, write_feature_tsv

__all__ = [
    "AnswerTable",
    "Corpus",
    "CorpusMismatchError",
    "DevicePrefetcher",
    "EpochBatchSampler",
    "Example",
    "FeatureFileError",
    "FeatureStore",
    "PretrainBatches",
    "PretrainDataset",
    "WordPieceTokenizer",
    "batch_loader",
    "build_corpus",
    "build_examples",
    "convert_tsv_to_store",
    "ensure_corpus",
    "is_corpus",
    "is_store",
    "load_pretrain_json",
    "mask_words",
    "normalize_answer",
    "read_feature_tsv",
    "write_feature_tsv",
]
