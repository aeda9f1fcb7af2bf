"""Load an LXMERT checkpoint and run one batch through the pre-training model.

    python examples/run_batch.py [CHECKPOINT] [--full]

CHECKPOINT is a transformers directory (e.g. train.py's ``runs/pretrain/export``) or an authors'
``.pth``. Without one, a randomly initialised model (small, or the paper's size with ``--full``) is
saved in transformers' format to a temporary directory and loaded back, so the whole path runs
offline. The random batch follows the checkpoint's config (vocabulary size, feature width, box
coordinates) and, when the checkpoint has a ``vocab.txt``, its [CLS] / [SEP] ids.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import lxmert_fast

SMALL = dict(
    hidden_size=256, num_attention_heads=4, intermediate_size=1024, l_layers=2, x_layers=2, r_layers=2
)


def token_ids(checkpoint: str | None, vocab_size: int) -> tuple[int, int, list[int]]:
    """([CLS] id, [SEP] id, ids to draw words from) for the checkpoint's vocabulary: read from the
    ``vocab.txt`` beside it (train.py's export has one), else BERT's layout (101 / 102, words from
    1000 on) when the vocabulary is that large, else every id."""
    if checkpoint is not None:
        directory = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
        vocab_file = os.path.join(directory, "vocab.txt")
        if os.path.isfile(vocab_file):
            with open(vocab_file, encoding="utf-8") as f:
                words = [line.rstrip("\n") for line in f][:vocab_size]
            if "[CLS]" in words and "[SEP]" in words:
                plain = [i for i, w in enumerate(words) if not (w.startswith("[") and w.endswith("]"))]
                return words.index("[CLS]"), words.index("[SEP]"), plain or list(range(vocab_size))
    if vocab_size > 1000:
        return 101, 102, list(range(1000, vocab_size))
    return min(1, vocab_size - 1), min(2, vocab_size - 1), list(range(vocab_size))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", nargs="?", help="transformers directory or authors' .pth")
    parser.add_argument(
        "--full", action="store_true", help="random model of the paper's size (no checkpoint)"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--boxes", type=int, default=36, help="RoIs per image")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint
        if path is None:
            torch.manual_seed(0)
            config = lxmert_fast.LxmertConfig(**({} if args.full else SMALL))
            lxmert_fast.LxmertForPreTraining(config).save_pretrained(tmp)
            path = tmp
        model = lxmert_fast.LxmertForPreTraining.from_pretrained(path)
    config = model.config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    g = torch.Generator().manual_seed(0)
    batch, words, boxes = args.batch, min(20, config.max_position_embeddings), args.boxes
    if config.visual_pos_dim != 4:
        raise SystemExit(f"{path}: visual_pos_dim {config.visual_pos_dim}; this example draws 4-d boxes")
    cls_id, sep_id, plain = token_ids(args.checkpoint, config.vocab_size)
    pick = torch.randint(0, len(plain), (batch, words), generator=g)
    ids = torch.tensor(plain)[pick]
    ids[:, 0], ids[:, -1] = cls_id, sep_id  # [CLS] ... [SEP]
    feats = torch.rand(batch, boxes, config.visual_feat_dim, generator=g)
    xy = torch.rand(batch, boxes, 2, generator=g) * 0.5
    pos = torch.cat([xy, xy + torch.rand(batch, boxes, 2, generator=g) * 0.5], dim=-1)
    mask = torch.ones(batch, words)
    mask[1:, words * 3 // 4 :] = 0

    start = time.perf_counter()
    with torch.no_grad():
        out = model(
            input_ids=ids.to(device),
            visual_feats=feats.to(device),
            visual_pos=pos.to(device),
            attention_mask=mask.to(device),
            matched_label=torch.ones(batch, dtype=torch.long, device=device),
        )
    elapsed = time.perf_counter() - start
    print(
        f"model: {model.num_parameters():,} parameters on {device}, backend {lxmert_fast.current_backend()}"
    )
    print(f"MLM logits {tuple(out.prediction_logits.shape)}")
    if out.cross_relationship_score is not None:
        print(
            f"matching scores {tuple(out.cross_relationship_score.shape)}, "
            f"matching loss {out.losses['matched'].item():.4f}"
        )
        print(f"P(match) per pair: {out.cross_relationship_score.softmax(-1)[:, 1].tolist()}")
    if out.question_answering_score is not None:
        print(f"QA scores {tuple(out.question_answering_score.shape)}")
    print(f"forward of {batch} pairs: {elapsed * 1000:.1f} ms")


if __name__ == "__main__":
    main()
