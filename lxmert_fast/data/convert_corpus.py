"""``python -m lxmert_fast.data.convert_corpus OUT_DIR --json FILE.json [...] --vocab vocab.txt
--answer_table all_ans.json --store FEATURE_STORE``: pre-training JSON → corpus store
(:mod:`lxmert_fast.data.corpus`), tokenised and labelled once, with a progress bar."""

from __future__ import annotations

import argparse
import time

from lxmert_fast.data.corpus import build_corpus


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", help="corpus store directory to write (e.g. beside the feature store)")
    parser.add_argument("--json", nargs="+", required=True, help="pre-training JSON files (authors' format)")
    parser.add_argument("--vocab", required=True, help="BERT vocab.txt")
    parser.add_argument("--answer_table", required=True, help="answer table JSON, list of {ans, dsets}")
    parser.add_argument(
        "--answer_dsets", default="vqa,gqa,visual7w", help="keep answers of these datasets (comma-separated)"
    )
    parser.add_argument("--store", required=True, help="the feature store the sentences' images are in")
    parser.add_argument("--max_seq_len", type=int, default=20, help="[CLS] + pieces + [SEP], padded to this")
    parser.add_argument("--sources", help="keep only these sentence sources (comma-separated; default all)")
    args = parser.parse_args(argv)
    start = time.time()
    corpus = build_corpus(
        args.out_dir,
        args.json,
        args.vocab,
        args.answer_table,
        args.store,
        max_seq_len=args.max_seq_len,
        answer_dsets=[d for d in args.answer_dsets.split(",") if d],
        sources=[s for s in args.sources.split(",") if s] if args.sources else None,
    )
    print(
        f"{args.out_dir}: {len(corpus)} sentences ({', '.join(corpus.sources)}), "
        f"{int(corpus.label_offsets[-1])} answer entries, {time.time() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
