"""The fine-tuning job: VQA v2, GQA and NLVR2 on the authors' files, or on each task's embedded
synthetic set when no data is given (``finetune.py`` is its entry point).

The model is the task's (:mod:`lxmert_fast.finetune`): VQA/GQA the authors' QA head over the
task's answer table, NLVR2 the two-image head. It starts from ``--load`` (a pre-training export
or the authors' ``_LXRT.pth``: the backbone; the authors' ``--loadLXMERT``), from ``--load_qa``
(the backbone and the pre-training QA head's rows of the answers both tables share; the
authors' ``--loadLXMERTQA``), from ``--load_finetuned`` (a whole fine-tuned model: our export or
the authors' ``BEST.pth``), or from scratch (``--preset``) without any. Training is the shared
loop (:mod:`lxmert_fast.training.loop`); the held-out evaluation scores predictions as the
official evaluators do and writes them to ``OUTPUT/valid_predict.<json|csv>``. ``--test`` trains
nothing: it scores ``--valid`` and writes the submission file for ``--test_file``
(``OUTPUT/test_predict.json`` / ``.csv``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

import torch

from lxmert_fast.training import flags
from lxmert_fast.training.loop import Job, StepResult, run, set_up, zero3_inputs

TASK_NAMES = ("vqa", "gqa", "nlvr2")
DEFAULTS = flags.JobDefaults(
    output_name="finetune",
    lr="5e-5 with --load/--load_qa/--load_finetuned (the authors'), 5e-4 from scratch",
    epochs="4 (the authors' VQA/GQA; NLVR2 too); on a synthetic set on CPU, 300 steps (NLVR2 800)",
    warmup_ratio=0.1,
    eval_every=100,
    save_every=100,
)
RESUME_FIXED = {
    "task": "--task",
    "init": "--load / --load_qa / --load_finetuned / --preset",
    "max_seq_len": "--max_seq_len",
    "num_boxes": "--num_boxes",
    "train": "--train / --data_dir",
    "features": "--features / --store_dir",
}
# From scratch on CPU the synthetic sets need this many steps to beat the text-only baselines
# clearly (NLVR2 stays at chance for ~500 steps: both images must be read).
SYNTHETIC_CPU_STEPS = {"vqa": 300, "gqa": 300, "nlvr2": 800}


def parse_args(
    argv: list[str] | None = None, root: str | None = None, doc: str | None = None
) -> argparse.Namespace:
    """finetune.py's flags; defaults under ``root`` (finetune.py's directory; default the working
    directory): ROOT/runs/synthetic_data, ROOT/runs/finetune, ROOT/ds.json."""
    root = root or os.getcwd()
    p = argparse.ArgumentParser(
        description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", choices=TASK_NAMES, required=True)
    d = p.add_argument_group("data (default: the task's synthetic set in DATA_DIR/<task>)")
    flags.add_feature_args(
        d,
        root,
        data_dir_help="directory of the synthetic sets (shared with pre-training, so a model pre-trained there "
        "transfers)",
        fp16_help="store converted features as float16 (default, as pre-training); --no-fp16_features: float32",
    )
    d.add_argument(
        "--train", help="comma-separated training JSON files (authors' format, e.g. data/vqa/train.json)"
    )
    d.add_argument("--valid", help="comma-separated held-out JSON files (scored, e.g. data/vqa/minival.json)")
    d.add_argument("--test_file", help="comma-separated test JSON files (predicted for the submission file)")
    d.add_argument(
        "--vocab",
        help="WordPiece vocab.txt (default: the synthetic set's, or vocab.txt beside the --load* model; "
        "required otherwise)",
    )
    d.add_argument(
        "--ans2label",
        help="VQA/GQA answer table (default trainval_ans2label.json beside the first --train file)",
    )
    d.add_argument(
        "--label2ans",
        help="VQA/GQA answer list (default trainval_label2ans.json beside the first --train file)",
    )
    flags.add_loading_args(
        d,
        max_seq_len_help="default 20 (the authors'); 12 synthetic",
        num_boxes_help="default 36; the synthetic set's own count",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--load", help="pre-trained model: an export directory or the authors' _LXRT.pth (backbone)"
    )
    m.add_argument(
        "--load_qa",
        help="like --load, and the pre-training QA head's rows for the answers both tables share (VQA/GQA)",
    )
    m.add_argument(
        "--load_qa_answers",
        help="with --load_qa: the pre-training answer table (all_ans.json) the QA head scores (default: "
        "all_ans.json beside the model, as an export has it; the authors' is data/lxmert/all_ans.json)",
    )
    m.add_argument(
        "--load_finetuned", help="a fine-tuned model of this task: an export directory or BEST.pth"
    )
    m.add_argument(
        "--preset",
        choices=("tiny", "small", "paper"),
        default=None,
        help="model size when training from scratch (no --load*; default paper on GPU, small on CPU)",
    )
    m.add_argument("--test", action="store_true", help="train nothing: score --valid, predict --test_file")
    return flags.parse_job_args(p, DEFAULTS, root, argv, validate_args)


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    loads = [f for f in ("load", "load_qa", "load_finetuned") if getattr(args, f)]
    if len(loads) > 1:
        parser.error(
            f"arguments {' and '.join('--' + f for f in loads)}: pass one (each names where the model starts)"
        )
    if args.load_qa_answers and not args.load_qa:
        parser.error("argument --load_qa_answers: only with --load_qa")
    if args.load_qa and args.task == "nlvr2":
        parser.error("argument --load_qa: NLVR2's head is true/false, not answers; use --load")
    if args.preset and loads:
        parser.error(f"argument --preset: the model's size comes from --{loads[0]}; pass one of them")
    if args.test and not args.load_finetuned:
        parser.error("argument --test: needs --load_finetuned (the fine-tuned model to evaluate)")
    for flag in ("valid", "test_file"):
        if getattr(args, flag) and not args.train and not args.test:
            parser.error(f"argument --{flag}: given without --train (the synthetic set brings its own)")


class FinetuneJob(Job):
    """Fine-tuning one task (:data:`lxmert_fast.finetune.TASKS`) in the shared loop."""

    resume_fixed = RESUME_FIXED

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        import lxmert_fast
        from lxmert_fast.finetune import TASKS
        from lxmert_fast.training.pretrain import feature_sources

        self.task = TASKS[args.task]
        self.name = args.task
        self.zero3_leaf_modules = tuple(lxmert_fast.layers.ZERO3_LEAF_MODULES)
        self.use_synthetic = not (args.train or args.valid or args.test_file)
        self.store_dir = args.store_dir or os.path.join(args.data_dir, "feature_store")
        if self.use_synthetic:
            self.tsvs = []
        else:
            if not args.features:
                raise SystemExit(
                    "--features: required with --train/--valid/--test_file (feature TSV files or store directories)"
                )
            self.tsvs, self.store_path = feature_sources(args.features.split(","), self.store_dir)
        self.init = args.load or args.load_qa or args.load_finetuned
        # The flag that named it, for messages.
        self.init_flag = next(
            (f"--{f}" for f in ("load", "load_qa", "load_finetuned") if getattr(args, f)), None
        )
        self._init_state: dict[str, torch.Tensor] | None = None

    def init_state(self) -> dict[str, torch.Tensor]:
        """The weights ``self.init`` holds, read once (the config may be inferred from them)."""
        from lxmert_fast.checkpoint import read_state_dict

        if self._init_state is None:
            self._init_state = read_state_dict(self.init)
        return self._init_state

    def data_dirs(self) -> list[str]:
        if self.use_synthetic:
            return [self.args.data_dir]
        return [os.path.dirname(os.path.abspath(self.store_dir))] if self.tsvs else []

    def prepare_data(self) -> None:
        from lxmert_fast.finetune import synthetic

        args = self.args
        if self.use_synthetic:
            if not synthetic.is_current(args.task, args.data_dir):
                print(f"generating the synthetic {args.task} set in {args.data_dir}", flush=True)
                synthetic.generate(
                    args.task,
                    args.data_dir,
                    num_train=args.synthetic_images,
                    num_valid=max(20, args.synthetic_images // 10),
                )
        elif self.tsvs:
            from lxmert_fast.training.pretrain import ensure_store

            ensure_store(self.tsvs, self.store_dir, args.fp16_features, explicit=args.store_dir is not None)

    def _paths(self) -> dict[str, Any]:
        from lxmert_fast.finetune import synthetic

        args = self.args
        if self.use_synthetic:
            paths = synthetic.files(args.task, args.data_dir)
            return {**paths, "vocab": args.vocab or paths["vocab"]}
        split = lambda flag: flag.split(",") if flag else None  # noqa: E731
        train = split(args.train)
        first = next(f for f in (args.train, args.valid, args.test_file) if f).split(",")[0]
        beside = os.path.dirname(os.path.abspath(first))
        qa = args.task != "nlvr2"
        vocab = args.vocab
        if vocab is None and self.init and os.path.isfile(os.path.join(self.init, "vocab.txt")):
            vocab = os.path.join(self.init, "vocab.txt")
        if vocab is None:
            raise SystemExit(
                "--vocab: required with your data"
                + (f" ({self.init_flag} {self.init} has no vocab.txt beside it)" if self.init else "")
                + ": the WordPiece vocab.txt the model was pre-trained with (BERT's bert-base-uncased for the "
                "authors' models)"
            )
        return {
            "train": train,
            "valid": split(args.valid),
            "test": split(args.test_file),
            "ans2label": (args.ans2label or os.path.join(beside, "trainval_ans2label.json")) if qa else None,
            "label2ans": (args.label2ans or os.path.join(beside, "trainval_label2ans.json")) if qa else None,
            "store": self.store_path,
            "vocab": vocab,
            "num_boxes": 36,
            "max_seq_len": 20,
        }

    def setup(self) -> None:
        from lxmert_fast.data import FeatureStore, WordPieceTokenizer

        args = self.args
        paths = self._paths()
        if args.num_boxes is None:
            args.num_boxes = paths["num_boxes"]
        if args.max_seq_len is None:
            args.max_seq_len = paths["max_seq_len"]
        self.paths = paths
        self.store = FeatureStore(paths["store"])
        self.tokenizer = WordPieceTokenizer(paths["vocab"])
        self.data = self.task.build_data(
            self.store,
            self.tokenizer,
            train=None if args.test else paths["train"],
            valid=paths["valid"],
            test=paths["test"],
            ans2label=paths["ans2label"],
            label2ans=paths["label2ans"],
            max_seq_len=args.max_seq_len,
            num_boxes=args.num_boxes,
        )
        self.preset = args.preset or ("paper" if self.cuda else "small")
        self.config = self._config()

    def _config(self):
        from lxmert_fast import pretraining as pt
        from lxmert_fast.checkpoint import infer_config, to_hf_names
        from lxmert_fast.config import LxmertConfig

        if self.init is None:
            tasks = dict.fromkeys(("mlm", "matched", "obj", "qa"), False)
            return pt.build_config(
                self.preset, len(self.tokenizer), self.store.feature_dim, self.data.num_labels, tasks
            )
        config_file = os.path.join(self.init, "config.json") if os.path.isdir(self.init) else None
        if config_file and os.path.isfile(config_file):
            config = LxmertConfig.from_json_file(config_file)
        else:
            config = infer_config(to_hf_names(self.init_state()))
        flag = self.init_flag
        if config.visual_feat_dim != self.store.feature_dim:
            raise SystemExit(
                f"{flag} {self.init}: the model takes {config.visual_feat_dim}-d RoI features, the feature "
                f"store {self.paths['store']} holds {self.store.feature_dim}-d ones"
            )
        if config.vocab_size != len(self.tokenizer):
            raise SystemExit(
                f"{flag} {self.init}: the model's vocabulary has {config.vocab_size} word pieces, "
                f"{self.paths['vocab']} has {len(self.tokenizer)}; pass the vocab the model was trained with (--vocab)"
            )
        return config

    @property
    def train_size(self) -> int:
        return len(self.data.train)

    def default_lr(self) -> float:
        return 5e-5 if self.init else 5e-4

    def default_steps(self) -> tuple[float, int | None]:
        if not self.cuda and self.use_synthetic:
            return 4.0, SYNTHETIC_CPU_STEPS[self.args.task]
        return 4.0, None

    def recorded_args(self) -> dict[str, Any]:
        args = self.args
        return {
            "task": args.task,
            "init": os.path.abspath(self.init) if self.init else f"scratch:{self.preset}",
            "max_seq_len": args.max_seq_len,
            "num_boxes": args.num_boxes,
            "train": [os.path.abspath(f) for f in self.paths["train"]],
            "features": os.path.abspath(self.paths["store"]),
        }

    def build_model(self) -> torch.nn.Module:
        from lxmert_fast.checkpoint import load_state_dict_strict
        from lxmert_fast.finetune import load_pretrained_qa

        args = self.args
        model = self.task.build_model(self.config, self.data.num_labels, self.data.label2ans)
        if args.load:
            load_state_dict_strict(model, self.init_state(), backbone_only=True)
        elif args.load_qa:
            try:
                transfer = load_pretrained_qa(
                    model, args.load_qa, self.data.label2ans, answer_table=args.load_qa_answers
                )
            except (OSError, ValueError) as exc:
                raise SystemExit(f"--load_qa {args.load_qa}: {exc}") from None
            print(transfer, flush=True)
        elif args.load_finetuned:
            load_state_dict_strict(model, self.init_state())
        self._init_state = None  # the model holds the weights now
        model.lxmert.check_inputs = False  # checked on the host per batch (check_batch)
        return model

    def describe(self) -> str:
        sizes = ", ".join(
            f"{len(getattr(self.data, s))} {s}" for s in ("train", "valid", "test") if getattr(self.data, s)
        )
        start = f"from {self.init}" if self.init else f"from scratch (preset {self.preset})"
        return f"{self.args.task} {start}: {sizes} examples; {self.data.num_labels} labels; "

    def train_loader(self, sampler: Any, workers: int, pin_memory: bool):
        from torch.utils.data import DataLoader

        return DataLoader(self.data.train, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory)

    def check_batch(self, model: torch.nn.Module, batch: dict) -> None:
        """The model's value checks on the CPU batch (its own are off: no device sync per step)."""
        dims = batch["visual_pos"].shape[-2:]
        model.lxmert.check_input_values(
            batch["input_ids"], batch["token_type_ids"], batch["visual_pos"].reshape(-1, *dims)
        )

    def forward(self, engine: Any, batch: dict) -> tuple[Any, dict]:
        self.check_batch(engine.module, batch)
        use_vmask = not bool((batch["visual_mask"] > 0).all())
        batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
        inputs = self.task.model_inputs(batch, use_vmask)
        if engine.zero_optimization_stage() == 3 and engine.training:
            inputs = zero3_inputs(inputs, ("visual_feats", "visual_pos"))
        self.last_inputs = inputs
        return engine(**inputs), batch

    def train_step(self, engine: Any, batch: Any, micro_step: int, step: int, total_steps: int) -> StepResult:
        out, batch = self.forward(engine, batch)
        loss = self.task.loss(out, batch)
        return StepResult(loss, {}, self.task.accuracy_counts(out, batch), self.last_inputs)

    def flops(self, inputs: dict[str, Any]) -> int:
        from lxmert_fast.metrics import training_flops

        return training_flops(
            lambda: self.task.build_model(self.config, self.data.num_labels, self.data.label2ans),
            inputs,
            lambda out: self.task.scores(out).float().sum(),
        )

    def predict(self, engine: Any, dataset: Any, workers: int, limit: int | None = None) -> list:
        """Every rank's predictions of ``dataset`` (its first ``limit`` batches per rank), gathered on
        every rank."""
        import torch.distributed as dist
        from torch.utils.data import DataLoader

        from lxmert_fast.finetune.datasets import eval_batches

        sampler = eval_batches(len(dataset), self.micro, self.rank, self.world)
        if limit is not None:
            sampler = sampler[:limit]
        mine = []
        for batch in DataLoader(dataset, batch_sampler=sampler, num_workers=workers):
            out, on_device = self.forward(engine, batch)
            mine.extend(self.task.predictions(out, on_device, dataset))
        every = [mine]
        if self.world > 1:
            every = [None] * self.world
            dist.all_gather_object(every, mine)
        return list(dict(p for part in every for p in part).items())

    def evaluate(self, engine: Any, workers: int) -> dict[str, Any]:
        if self.data.valid is None:
            return {}
        predictions = self.predict(engine, self.data.valid, workers, self.args.eval_batches)
        ids = {p[0] for p in predictions}
        examples = self.data.valid.examples
        if len(ids) < len(examples):  # --eval_batches: scored on the examples predicted
            examples = [e for e in examples if self.task.example_id(e) in ids]
        scores = self.task.evaluate(predictions, examples)
        if self.rank == 0:
            self.task.write_submission(
                predictions,
                os.path.join(self.args.output_dir, f"valid_predict.{self.task.submission_suffix}"),
            )
        return {k: round(v, 5) if isinstance(v, float) else v for k, v in scores.items()}

    def export(self, state: dict[str, torch.Tensor], directory: str) -> None:
        fresh = self.task.build_model(self.config, self.data.num_labels, self.data.label2ans)
        fresh.load_state_dict(state)
        fresh.save_pretrained(directory)
        shutil.copy(self.paths["vocab"], os.path.join(directory, "vocab.txt"))


def evaluate_only(job: FinetuneJob, args: argparse.Namespace) -> None:
    """``--test``: score --valid and predict --test_file with the --load_finetuned model; nothing is
    trained or checkpointed. Writes OUTPUT/{valid,test}_predict.<json|csv> and OUTPUT/scores.json."""
    import torch.distributed as dist

    from lxmert_fast import atomic
    from lxmert_fast.training import dist as rdist

    cuda, rank, world, _ = rdist.start_processes(args)
    layout = rdist.detect_layout(args.storage, args.output_dir, job.data_dirs())
    micro = flags.ds_config(args, cuda, world, args.default_config)["train_micro_batch_size_per_gpu"]
    set_up(job, cuda, rank, world, micro, layout)
    model = job.build_model().to("cuda" if cuda else "cpu").eval()

    class Engine:  # what FinetuneJob.forward needs of a DeepSpeed engine
        module, device, training = model, next(model.parameters()).device, False

        def __call__(self, **inputs):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                return model(**inputs)

        def zero_optimization_stage(self) -> int:
            return 0

    workers = args.num_workers if args.num_workers is not None else (4 if cuda else 0)
    scores = {}
    with torch.no_grad():
        if job.data.valid is not None:
            scores = job.evaluate(Engine(), workers)
        if job.data.test is not None:
            predictions = job.predict(Engine(), job.data.test, workers)
            if rank == 0:
                path = os.path.join(args.output_dir, f"test_predict.{job.task.submission_suffix}")
                job.task.write_submission(predictions, path)
                print(f"{len(predictions)} test predictions in {path}", flush=True)
    if rank == 0:
        atomic.atomic_write_text(os.path.join(args.output_dir, "scores.json"), json.dumps(scores, indent=1))
        print(f"{args.task} --test: {json.dumps(scores)}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def main(argv: list[str] | None = None, root: str | None = None, doc: str | None = None) -> None:
    args = parse_args(argv, root, doc)
    job = FinetuneJob(args)
    if args.test:
        os.makedirs(args.output_dir, exist_ok=True)
        evaluate_only(job, args)
    run(job, args, args.default_config)
