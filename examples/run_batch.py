"""Load an LXMERT checkpoint and run one batch through the pre-training model.

    python examples/run_batch.py [CHECKPOINT] [--full]

CHECKPOINT is a transformers directory or an authors' ``.pth``. Without one, a randomly
initialised model (small, or the paper's size with ``--full``) is saved in transformers'
format to a temporary directory and loaded back, so the whole path runs offline.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import lxmert_fast

SMALL = dict(
    hidden_size=256, num_attention_heads=4, intermediate_size=1024, l_layers=2, x_layers=2, r_layers=2
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", nargs="?", help="transformers directory or authors' .pth")
    parser.add_argument(
        "--full", action="store_true", help="random model of the paper's size (no checkpoint)"
    )
    parser.add_argument("--batch", type=int, default=4)
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
    batch, words, boxes = args.batch, 20, 36
    ids = torch.randint(1000, config.vocab_size, (batch, words), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    feats = torch.rand(batch, boxes, config.visual_feat_dim, generator=g)
    xy = torch.rand(batch, boxes, 2, generator=g) * 0.5
    pos = torch.cat([xy, xy + torch.rand(batch, boxes, 2, generator=g) * 0.5], dim=-1)
    mask = torch.ones(batch, words)
    mask[1:, 15:] = 0

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
    print(
        f"MLM logits {tuple(out.prediction_logits.shape)}, matching scores {tuple(out.cross_relationship_score.shape)}"
    )
    print(
        f"QA scores {tuple(out.question_answering_score.shape)}, matching loss {out.losses['matched'].item():.4f}"
    )
    print(f"P(match) per pair: {out.cross_relationship_score.softmax(-1)[:, 1].tolist()}")
    print(f"forward of {batch} pairs: {elapsed * 1000:.1f} ms")


if __name__ == "__main__":
    main()
