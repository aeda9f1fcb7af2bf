"""``python -m lxmert_fast.data.convert OUT_DIR FILE.tsv [FILE.tsv ...] [--fp16]``: TSV → feature store."""

from __future__ import annotations

import argparse
import time

from lxmert_fast.data.store import convert_tsv_to_store


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", help="store directory to write")
    parser.add_argument("tsv", nargs="+", help="feature TSV files (e.g. mscoco_train_obj36.tsv)")
    parser.add_argument("--fp16", action="store_true", help="store features as float16 (half the disk)")
    args = parser.parse_args(argv)
    start = time.time()
    index = convert_tsv_to_store(args.tsv, args.out_dir, fp16=args.fp16)
    print(
        f"{args.out_dir}: {len(index['images'])} images, {index['num_boxes_total']} boxes, "
        f"features {index['feature_dim']} x {index['feature_dtype']}, {time.time() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
