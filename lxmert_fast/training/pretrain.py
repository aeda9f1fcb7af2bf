"""The pre-training job: every task of the paper on the authors' data formats, or on the
embedded synthetic set when no data is given (``train.py`` is its entry point).

Data: with no data flags the synthetic set (``python -m lxmert_fast.data.synthetic``) is
generated into ``--data_dir`` (or reused) and converted once to a memory-mapped feature store;
this runs on global rank 0 when the directories are shared by all nodes, and on every node's
local rank 0 when each node has its own (:mod:`lxmert_fast.training.dist`). Batches are checked
on the host (the model's own value checks are off so the step never waits on the device), and
the sparse heads' positions are chosen there, so the step on the device has fixed shapes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
from typing import Any

import torch

from lxmert_fast.training import flags
from lxmert_fast.training.flags import PROBABILITY, float_flag
from lxmert_fast.training.loop import Job, StepResult, run, zero3_inputs

TASKS = ("mlm", "matched", "obj", "qa")
VISUAL_LOSSES = ("obj", "attr", "feat")
DEFAULTS = flags.JobDefaults(
    output_name="pretrain",
    lr="1e-4 paper, 1e-3 small/tiny",
    epochs="20; on the synthetic set on CPU, 1000 steps unless --epochs or --max_steps is given",
)
# Beyond the loop's own (lxmert_fast.training.flags.RESUME_FIXED / RESUME_CHANGEABLE).
RESUME_FIXED = {
    "preset": "--preset",
    "max_seq_len": "--max_seq_len",
    "num_boxes": "--num_boxes",
    "tasks": "--task_*",
    "visual_losses": "--visual_losses",
    "train": "--train / --data_dir",
    "features": "--features / --store_dir",
}
RESUME_CHANGEABLE = {
    "weights": ("--weight_*", "the new loss weights apply from this step"),
    "qa_schedule": ("--qa_schedule", "applies from this step"),
    "obj_loss_on": ("--obj_loss_on", "applies from this step"),
    "word_mask_rate": ("--word_mask_rate", "new masking from this step"),
    "obj_mask_rate": ("--obj_mask_rate", "new masking and visual-loss scale from this step"),
    "mismatch_rate": ("--mismatch_rate", "new mismatched pairs from this step"),
}


def parse_args(
    argv: list[str] | None = None, root: str | None = None, doc: str | None = None
) -> argparse.Namespace:
    """train.py's flags; defaults under ``root`` (the directory of train.py; default the working
    directory): ROOT/runs/synthetic_data, ROOT/runs/pretrain, ROOT/ds.json."""
    root = root or os.getcwd()
    p = argparse.ArgumentParser(
        description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = p.add_argument_group("data (default: the synthetic set in --data_dir)")
    flags.add_feature_args(
        d,
        root,
        data_dir_help="directory of the data; generated synthetic data if it has no meta.json and no --train",
        fp16_help="store converted features as float16 (default: half the bytes to read, pin and copy; "
        "cast to float32 on the device); --no-fp16_features keeps float32",
    )
    d.add_argument("--train", help="comma-separated pre-training JSON files (authors' format)")
    d.add_argument("--valid", help="comma-separated held-out pre-training JSON files")
    d.add_argument(
        "--corpus_dir",
        help="where the pre-tokenised corpus stores corpus_train/ and corpus_valid/ are built (default "
        "DATA_DIR); stale stores are rebuilt there by default, refused when named here",
    )
    d.add_argument("--vocab", help="WordPiece vocab.txt (default DATA_DIR/vocab.txt)")
    d.add_argument(
        "--answer_table", help="answer table JSON, list of {ans, dsets} (default DATA_DIR/all_ans.json)"
    )
    d.add_argument("--answer_dsets", default="vqa,gqa,visual7w", help="keep answers of these datasets")
    d.add_argument(
        "--object_words",
        help="file of object nouns for the masked-object-word probe "
        "(default DATA_DIR/object_words.txt if present)",
    )
    flags.add_loading_args(
        d,
        max_seq_len_help="[CLS] + words + [SEP], padded (default 20, the authors'; 12 for the synthetic set)",
        num_boxes_help="boxes per image (default 36; the synthetic set's own count)",
    )

    m = p.add_argument_group("model")
    m.add_argument(
        "--preset",
        choices=("tiny", "small", "paper"),
        default=None,
        help="model size (default paper on GPU, small on CPU)",
    )

    t = p.add_argument_group("tasks (authors' weights are all 1; visual losses carry 1/obj_mask_rate)")
    for task in TASKS:
        t.add_argument(f"--task_{task}", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--visual_losses", default="obj,attr,feat", help="subset of obj,attr,feat")
    for loss in ("mlm", "matched", "obj", "attr", "feat", "qa"):
        t.add_argument(f"--weight_{loss}", type=float_flag(0.0), default=1.0)
    t.add_argument(
        "--obj_loss_on",
        choices=("all", "masked"),
        default="all",
        help="obj/attr cross-entropy over all objects (authors' code, default) or masked ones only",
    )
    t.add_argument(
        "--qa_schedule",
        choices=("constant", "authors"),
        default="constant",
        help="constant: QA weight 1 throughout (released code); authors: 0 for the first half, then 2",
    )
    t.add_argument("--word_mask_rate", type=PROBABILITY, default=0.15)
    t.add_argument(
        "--obj_mask_rate",
        type=float_flag(0.0, 1.0, low_open=True),
        default=0.15,
        help="probability an object is masked, in (0, 1]: visual losses are scaled by its inverse "
        "(--no-task_obj turns them off)",
    )
    t.add_argument(
        "--mismatch_rate", type=PROBABILITY, default=0.5, help="probability the sentence is replaced"
    )

    return flags.parse_job_args(p, DEFAULTS, root, argv, validate_args)


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks across flags and of list-valued flags; errors the argparse way (usage, exit 2)."""
    visual = [v for v in args.visual_losses.split(",") if v]
    unknown = [v for v in visual if v not in VISUAL_LOSSES]
    if unknown:
        parser.error(
            f"argument --visual_losses: expected a comma-separated subset of {','.join(VISUAL_LOSSES)}, "
            f"got {args.visual_losses!r}"
        )
    if not any(getattr(args, f"task_{t}") for t in TASKS):
        parser.error("arguments --task_*: every task is off; enable at least one of " + ", ".join(TASKS))
    if not [d for d in args.answer_dsets.split(",") if d]:
        parser.error("argument --answer_dsets: expected at least one dataset name, got ''")
    if args.valid and not args.train:
        parser.error("argument --valid: given without --train (the synthetic set brings its own)")


def feature_sources(features: list[str], store_dir: str) -> tuple[list[str], str]:
    """(the feature TSVs among ``features``, the one store the job reads): ``features`` holds TSV
    files, converted into ``store_dir``, and/or store directories; all told exactly one store."""
    from lxmert_fast.data import is_store

    tsvs = [f for f in features if not is_store(f)]
    stores = [f for f in features if is_store(f)] + ([store_dir] if tsvs else [])
    if len(stores) != 1:
        raise SystemExit(f"--features: expected TSVs and/or exactly one store directory, got stores {stores}")
    return tsvs, stores[0]


def ensure_store(tsvs: list[str], store_dir: str, fp16: bool, explicit: bool) -> None:
    """Convert ``tsvs`` into ``store_dir`` unless it already is their conversion (same files, sizes,
    times, dtype, as the store records). A store of other files is rebuilt when it is the default
    ``DATA_DIR/feature_store`` and refused when named by --store_dir: never used in their place."""
    from lxmert_fast.data import convert_tsv_to_store, is_store
    from lxmert_fast.data.store import store_mismatch

    if is_store(store_dir):
        why = store_mismatch(store_dir, tsvs, fp16=fp16)
        if why is None:
            return
        if explicit:
            raise SystemExit(
                f"--store_dir {store_dir}: not a conversion of --features as given ({why}); remove it, "
                "name another --store_dir, or pass the store directory itself in --features"
            )
        print(f"re-converting the feature store: {why}", flush=True)
    print(f"converting {len(tsvs)} feature TSV file(s) to {store_dir} (once)", flush=True)
    convert_tsv_to_store(tsvs, store_dir, fp16=fp16)


def answer_entries(path: str, kept: list[str]) -> list[dict]:
    """The entries of the answer table at ``path`` whose answers are ``kept``, in ``kept``'s order
    (the answer head's label order): the table the exported model's QA head was sized for."""
    with open(path, encoding="utf-8") as f:
        by_answer = {e["ans"]: e for e in json.load(f)}
    return [by_answer[a] for a in kept]


def metrics_flops(model_config, inputs: dict, task_weights: dict[str, float]) -> int:
    """FLOPs of one training micro-step (forward, weighted losses, backward) at ``inputs``' shapes."""
    import lxmert_fast
    from lxmert_fast import pretraining as pt
    from lxmert_fast.metrics import training_flops

    return training_flops(
        lambda: lxmert_fast.LxmertForPreTraining(model_config),
        inputs,
        lambda out: pt.weighted_loss(out.losses, task_weights),
    )


def default_steps(args: argparse.Namespace, cuda: bool) -> tuple[float, int | None]:
    """(epochs, steps) without --epochs / --max_steps: 20 epochs (the paper's), except on the
    synthetic set on the CPU, whose epochs are a few steps: 1000 steps."""
    return 20.0, (1000 if not cuda and args.train is None else None)


class PretrainJob(Job):
    """LXMERT pre-training (:mod:`lxmert_fast.pretraining`): MLM, cross-modality matching, masked
    objects (labels, attributes, features) and QA."""

    name = "pretrain"
    resume_fixed = RESUME_FIXED
    resume_changeable = RESUME_CHANGEABLE

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        import lxmert_fast
        from lxmert_fast.data import synthetic

        self.zero3_leaf_modules = tuple(lxmert_fast.layers.ZERO3_LEAF_MODULES)
        self.use_synthetic = args.train is None
        self.store_dir = args.store_dir or os.path.join(args.data_dir, "feature_store")
        if self.use_synthetic:
            self.train_json = [os.path.join(args.data_dir, "train.json")]
            self.valid_json = [os.path.join(args.data_dir, "valid.json")]
            self.features = [os.path.join(args.data_dir, synthetic.feature_file(s)) for s in synthetic.SPLITS]
        else:
            if not args.features:
                raise SystemExit("--features: required with --train (feature TSV files or store directories)")
            self.train_json = args.train.split(",")
            self.valid_json = args.valid.split(",") if args.valid else []
            self.features = args.features.split(",")
        self.tsvs, self.store_path = feature_sources(self.features, self.store_dir)
        self.corpus_dir = args.corpus_dir or args.data_dir
        self.vocab = args.vocab or os.path.join(args.data_dir, "vocab.txt")
        self.answers_path = args.answer_table or os.path.join(args.data_dir, "all_ans.json")
        if args.num_boxes is None:
            args.num_boxes = synthetic.NUM_BOXES if self.use_synthetic else 36
        if args.max_seq_len is None:
            args.max_seq_len = synthetic.MAX_SEQ_LEN if self.use_synthetic else 20

    def data_dirs(self) -> list[str]:
        # What prepare_data writes: the synthetic set, the converted store, the corpus stores.
        dirs = [self.args.data_dir] if self.use_synthetic else []
        if self.tsvs:
            dirs.append(os.path.dirname(os.path.abspath(self.store_dir)))
        return [*dirs, self.corpus_dir]

    def corpus_path(self, split: str) -> str:
        return os.path.join(self.corpus_dir, f"corpus_{split}")

    def prepare_data(self) -> None:
        """Generate the synthetic set if missing or older, convert feature TSVs to the store, and
        build the pre-tokenised corpus stores of the training and held-out JSON (each once)."""
        from lxmert_fast.data import ensure_corpus, is_store, synthetic
        from lxmert_fast.data.corpus import CorpusMismatchError

        args = self.args
        if self.use_synthetic and not synthetic.is_current(args.data_dir):
            older = os.path.isfile(os.path.join(args.data_dir, "meta.json"))
            if older and is_store(self.store_dir):
                # Converted from a set of an older generator (other files, other box count):
                # it must be rebuilt, or training would mix the two formats.
                if args.store_dir is not None:
                    raise SystemExit(
                        f"--store_dir {self.store_dir}: converted from an older synthetic set in {args.data_dir}; "
                        "remove it or name another directory, so it can be rebuilt from the new set"
                    )
                shutil.rmtree(self.store_dir)
            if older:
                print(f"regenerating the synthetic dataset in {args.data_dir} (older format)", flush=True)
            else:
                print(f"generating the synthetic dataset in {args.data_dir}", flush=True)
            synthetic.generate(
                args.data_dir, num_train=args.synthetic_images, num_valid=max(20, args.synthetic_images // 10)
            )
        if self.tsvs:
            ensure_store(self.tsvs, self.store_dir, args.fp16_features, explicit=args.store_dir is not None)
        for split, paths in (("train", self.train_json), ("valid", self.valid_json)):
            if not paths:
                continue
            try:
                ensure_corpus(
                    self.corpus_path(split),
                    paths,
                    self.vocab,
                    self.answers_path,
                    self.store_path,
                    max_seq_len=args.max_seq_len,
                    answer_dsets=args.answer_dsets.split(","),
                    explicit=args.corpus_dir is not None,
                    progress=not args.no_progress,
                )
            except CorpusMismatchError as exc:
                raise SystemExit(f"--corpus_dir {self.corpus_dir}: {exc}") from None

    def setup(self) -> None:
        from lxmert_fast import pretraining as pt
        from lxmert_fast.data import AnswerTable, Corpus, FeatureStore, PretrainBatches, WordPieceTokenizer

        args = self.args
        object_words = args.object_words or os.path.join(args.data_dir, "object_words.txt")
        store = FeatureStore(self.store_path)
        tokenizer = WordPieceTokenizer(self.vocab)
        self.answers = AnswerTable.load(self.answers_path, dsets=args.answer_dsets.split(","))
        train_corpus = Corpus(self.corpus_path("train"))
        valid_corpus = Corpus(self.corpus_path("valid")) if self.valid_json else None
        probe = None
        if os.path.isfile(object_words):
            with open(object_words) as f:
                probe = {tokenizer.vocab[w] for w in (line.strip() for line in f) if w in tokenizer.vocab}
        dataset = functools.partial(PretrainBatches, store=store, num_boxes=args.num_boxes)
        corruption = dict(word_mask_rate=args.word_mask_rate, mismatch_rate=args.mismatch_rate)
        self.train_set = dataset(train_corpus, seed=args.seed, **corruption)
        # Held-out sets: the training corruption with its own seed, and the object-word probe.
        self.eval_sets = []
        if valid_corpus is not None and len(valid_corpus):
            self.eval_sets.append(("", dataset(valid_corpus, seed=args.seed + 1, **corruption)))
            if probe:
                clean = dict(word_mask_rate=0.0, mismatch_rate=0.0, mask_object_words=probe)
                self.eval_sets.append(("object_word_", dataset(valid_corpus, seed=args.seed + 1, **clean)))
        self.num_valid = len(valid_corpus) if valid_corpus is not None else 0
        self.preset = args.preset or ("paper" if self.cuda else "small")
        self.tasks = {t: getattr(args, f"task_{t}") for t in TASKS}
        self.weights = {k: getattr(args, f"weight_{k}") for k in pt.TASK_LOSSES}
        self.model_config = pt.build_config(
            self.preset,
            len(tokenizer),
            store.feature_dim,
            len(self.answers),
            self.tasks,
            [v for v in args.visual_losses.split(",") if v],
            obj_mask_rate=args.obj_mask_rate,
        )

    @property
    def train_size(self) -> int:
        return len(self.train_set)

    def default_lr(self) -> float:
        return 1e-4 if self.preset == "paper" else 1e-3

    def default_steps(self) -> tuple[float, int | None]:
        return default_steps(self.args, self.cuda)

    def recorded_args(self) -> dict[str, Any]:
        args = self.args
        return {
            "preset": self.preset,
            "max_seq_len": args.max_seq_len,
            "num_boxes": args.num_boxes,
            "tasks": [t for t in TASKS if self.tasks[t]],
            "visual_losses": sorted(v for v in args.visual_losses.split(",") if v),
            "train": [os.path.abspath(f) for f in self.train_json],
            "features": os.path.abspath(self.store_path),
            "weights": self.weights,
            "qa_schedule": args.qa_schedule,
            "obj_loss_on": args.obj_loss_on,
            "word_mask_rate": args.word_mask_rate,
            "obj_mask_rate": args.obj_mask_rate,
            "mismatch_rate": args.mismatch_rate,
        }

    def build_model(self) -> torch.nn.Module:
        import lxmert_fast

        model = lxmert_fast.LxmertForPreTraining(self.model_config)
        model.lxmert.check_inputs = False  # checked on the host per batch (check_batch)
        return model

    def describe(self) -> str:
        return f"preset {self.preset}: {len(self.train_set)} train / {self.num_valid} held-out sentences; "

    def loader(self, dataset: Any, sampler: Any, workers: int, pin_memory: bool):
        """``(host batch, device batch)`` pairs: whole batches from the corpus store, the next one
        copied to the device while this one trains."""
        from lxmert_fast.data import DevicePrefetcher, batch_loader

        loader = batch_loader(dataset, sampler, num_workers=workers, pin_memory=pin_memory)
        return DevicePrefetcher(loader, self.device, feature_dtype=torch.float32)

    def train_loader(self, sampler: Any, workers: int, pin_memory: bool):
        self.train_set.set_epoch(sampler.epoch)
        return self.loader(self.train_set, sampler, workers, pin_memory)

    def check_batch(self, engine: Any, host: dict, dataset: Any) -> None:
        """The model's value checks (ids, boxes, class ids), run here on the CPU batch: the model's
        own are off (model.lxmert.check_inputs) so that the step never waits on the device."""
        from lxmert_fast import pretraining as pt

        try:
            pt.check_batch(engine.module, host)
        except ValueError as exc:
            images = sorted(set(dataset.image_ids(host["index"].tolist())))
            raise ValueError(f"{exc} (a batch of images {', '.join(images)})") from exc

    def run_batch(self, engine: Any, pair: tuple[dict, dict], obj_seed: int, obj_offset: int, dataset: Any):
        from lxmert_fast import pretraining as pt

        args = self.args
        host, batch = pair
        self.check_batch(engine, host, dataset)
        use_vmask = not bool((host["visual_mask"] > 0).all())
        # Sparse heads: the rows to decode come from the CPU batch, so the step on the device has
        # fixed shapes and no value-dependent control flow.
        positions = pt.head_positions(
            host, self.model_config, args.word_mask_rate, obj_seed, obj_offset, args.obj_mask_rate
        )
        batch = {k: v.to(engine.device, non_blocking=True) for k, v in {**batch, **positions}.items()}
        feats, obj_labels, selected = batch["visual_feats"], None, None
        if self.model_config.task_obj_predict:
            feats, obj_labels, selected = pt.mask_objects(
                batch, obj_seed, obj_offset, args.obj_mask_rate, args.obj_loss_on
            )
        inputs = pt.model_inputs(batch, feats, obj_labels, use_vmask)
        if engine.zero_optimization_stage() == 3 and engine.training:
            inputs = zero3_inputs(inputs, ("visual_feats", "visual_pos"))
        if not hasattr(self, "visual_logits"):
            self.visual_logits = pt.VisualLogits(engine.module)  # hooks the heads: before the forward
        out = engine(**inputs)
        return out, pt.accuracy_counts(out, batch, selected, self.visual_logits.pop()), inputs

    def train_step(self, engine: Any, batch: Any, micro_step: int, step: int, total_steps: int) -> StepResult:
        from lxmert_fast import pretraining as pt

        args = self.args
        qa_w = pt.qa_weight(args.qa_schedule, step, total_steps)
        self.task_weights = {**self.weights, "qa": self.weights["qa"] * qa_w}
        offset = (micro_step * self.world + self.rank) * self.micro * args.num_boxes
        out, counts, inputs = self.run_batch(engine, batch, args.seed, offset, self.train_set)
        return StepResult(pt.weighted_loss(out.losses, self.task_weights), dict(out.losses), counts, inputs)

    def flops(self, inputs: dict[str, Any]) -> int:
        return metrics_flops(self.model_config, inputs, self.task_weights)

    def evaluate(self, engine: Any, workers: int) -> dict[str, Any]:
        import torch.distributed as dist

        from lxmert_fast.data import EpochBatchSampler
        from lxmert_fast.metrics import accuracies

        if not self.eval_sets:
            return {}
        args, rank, world, micro = self.args, self.rank, self.world, self.micro
        result = {}
        for prefix, eval_set in self.eval_sets:
            sums, losses, n = {}, {}, 0
            eval_sampler = EpochBatchSampler(self.num_valid, micro, rank, world, shuffle=False)
            for i, pair in enumerate(self.loader(eval_set, eval_sampler, workers, pin_memory=self.cuda)):
                if args.eval_batches is not None and i >= args.eval_batches:
                    break
                out, counts, _ = self.run_batch(
                    engine, pair, args.seed + 2, (i * world + rank) * micro * args.num_boxes, eval_set
                )
                for k, v in counts.items():
                    sums[k] = sums.get(k, 0) + v
                for k, v in out.losses.items():
                    losses[k] = losses.get(k, 0.0) + v.detach().float()
                n += 1
            if prefix:
                sums = {"mlm": sums["mlm"]} if "mlm" in sums else {}
                losses = {}
            keys = sorted(sums)
            if keys:
                stacked = torch.stack([sums[k] for k in keys])
                dist.all_reduce(stacked)
                totals = dict(zip(keys, stacked, strict=True))
                result.update({f"{prefix}{k}_acc": v for k, v in accuracies(totals).items()})
            keys = sorted(losses)
            if keys:
                # Mean over every rank's batches (each rank ran the same number: one shared sampler).
                count = torch.tensor(float(n), device=engine.device)
                stacked = torch.stack([losses[k] for k in keys] + [count])
                dist.all_reduce(stacked)
                total = max(float(stacked[-1]), 1.0)
                result.update(
                    {f"{k}_loss": round(float(v) / total, 5) for k, v in zip(keys, stacked[:-1], strict=True)}
                )
        return result

    def export(self, state: dict[str, torch.Tensor], directory: str) -> None:
        import lxmert_fast

        fresh = lxmert_fast.LxmertForPreTraining(self.model_config)
        fresh.load_state_dict(state)
        # config.id2label names the QA head's outputs (transformers' convention; the Answerer reads it).
        if len(self.answers) == self.model_config.num_qa_labels:
            lxmert_fast.set_answer_labels(fresh, self.answers.answers)
        fresh.save_pretrained(directory)
        shutil.copy(self.vocab, os.path.join(directory, "vocab.txt"))
        # The table the QA head was sized for (--answer_dsets applied), not the file as given.
        with open(os.path.join(directory, "all_ans.json"), "w", encoding="utf-8") as f:
            json.dump(answer_entries(self.answers_path, self.answers.answers), f, indent=0)


def main(argv: list[str] | None = None, root: str | None = None, doc: str | None = None) -> None:
    args = parse_args(argv, root, doc)
    run(PretrainJob(args), args, args.default_config)
