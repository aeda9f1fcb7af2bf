"""BERT WordPiece tokenisation from a ``vocab.txt`` through the ``tokenizers`` library.

transformers 5's ``BertTokenizerFast(vocab_file=path)`` silently builds a 5-token
vocabulary (every word becomes [UNK]); the ``tokenizers`` WordPiece model reads the file
itself, and :func:`load_tokenizer` checks the result against the file.
"""

from __future__ import annotations

import os

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class WordPieceTokenizer:
    """Lower-cased BERT tokenisation: ``encode(sentence, max_len)`` → ``[CLS] + pieces[:max_len-2] + [SEP]``."""

    def __init__(self, vocab_path: str | os.PathLike, lowercase: bool = True) -> None:
        from tokenizers import BertWordPieceTokenizer

        self.vocab_path = os.fspath(vocab_path)
        try:
            with open(self.vocab_path, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
        except UnicodeDecodeError as exc:
            raise ValueError(f"{self.vocab_path}: not a UTF-8 vocab.txt ({exc})") from exc
        # Checked before the tokenizers library sees the file: it reports an empty or cut-off
        # vocabulary as "sep_token not found", without the path.
        missing = [t for t in SPECIAL_TOKENS if t not in set(lines)]
        if missing:
            what = "the file is empty" if not any(lines) else f"{len(lines)} lines"
            raise ValueError(
                f"{self.vocab_path}: special tokens {missing} missing from the vocabulary ({what}); "
                "expected a BERT vocab.txt, one word piece per line"
            )
        self._tok = BertWordPieceTokenizer(self.vocab_path, lowercase=lowercase)
        vocab = self._tok.get_vocab()
        if len(vocab) != len(set(lines)):
            raise ValueError(
                f"{self.vocab_path}: tokenizer loaded {len(vocab)} entries, the file has {len(set(lines))}"
            )
        self.vocab = vocab
        self.ids_to_tokens = {i: t for t, i in vocab.items()}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (vocab[t] for t in SPECIAL_TOKENS)

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, sentence: str) -> list[str]:
        return self._tok.encode(sentence, add_special_tokens=False).tokens

    def encode(self, sentence: str, max_len: int) -> list[int]:
        pieces = self._tok.encode(sentence, add_special_tokens=False).ids[: max_len - 2]
        return [self.cls_id, *pieces, self.sep_id]

    def encode_batch(self, sentences: list[str], max_len: int) -> list[list[int]]:
        """:meth:`encode` of each sentence, tokenised in one call (in parallel by the library)."""
        encodings = self._tok.encode_batch(sentences, add_special_tokens=False)
        return [[self.cls_id, *e.ids[: max_len - 2], self.sep_id] for e in encodings]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.ids_to_tokens[i] for i in ids]
