"""The training options, named as in the Hugging Face Flax example scripts where they exist.

`parse_arguments(argv)` reads `--config recipe.yaml` first (see bart_jax.training.recipes),
then lets every command-line flag override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from typing import Optional, Sequence

from bart_jax.model.layers import REMAT_POLICIES
from bart_jax.training import recipes

TASKS = ("denoise", "seq2seq", "classify", "qa")
# Where metrics can be reported besides metrics.jsonl (bart_jax.training.reporting).
INTEGRATIONS = ("tensorboard", "wandb")
DTYPES = ("float32", "bfloat16")
# Columns read when none is given, by task.
DEFAULT_COLUMNS = {
    "denoise": {"text_column": "text"},
    "seq2seq": {"text_column": "document", "summary_column": "summary"},
    "classify": {"text_column": "sentence1", "label_column": "label"},
    "qa": {"question_column": "question", "context_column": "context", "answer_column": "answers"},
}


@dataclasses.dataclass
class TrainingArguments:
    # --- what to train -------------------------------------------------------------------------
    output_dir: str = dataclasses.field(default="", metadata={"help": "where checkpoints, metrics and the model go"})
    task: str = dataclasses.field(default="seq2seq", metadata={"help": f"one of {', '.join(TASKS)}"})
    model_name_or_path: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "a Hugging Face or converted bart_jax directory (or hub id) to start from"})
    config_name: Optional[str] = dataclasses.field(
        default=None,
        metadata={"help": "train from scratch: a config directory (e.g. configs/bart-base) or config.json"})
    config_overrides: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "config changes, e.g. 'd_model=256,encoder_layers=3,dropout=0.1'"})
    tokenizer_name: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "tokenizer directory (default: the model's or config's directory)"})
    dtype: str = dataclasses.field(
        default="float32", metadata={"help": "computation dtype (float32 or bfloat16); weights stay float32"})
    scan_layers: bool = dataclasses.field(
        default=False, metadata={"help": "run each layer stack as one scan over stacked weights (faster compilation; "
                                         "checkpoints hold the stacked layout, the exported model does not)"})
    remat_policy: str = dataclasses.field(
        default="none", metadata={"help": "recompute layer activations in the backward pass to save memory: "
                                          f"{', '.join(REMAT_POLICIES)}"})
    # --- data ------------------------------------------------------------------------------------
    train_file: Optional[str] = dataclasses.field(
        default=None, metadata={"help": ".jsonl/.arrow/.parquet/.json/.csv/.tsv file, a glob of such files "
                                        "(shards/*.jsonl) or a saved dataset directory"})
    validation_file: Optional[str] = dataclasses.field(default=None, metadata={"help": "evaluation data"})
    dataset_name: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "a Hugging Face dataset (hub name or local dataset directory) instead of "
                                        "--train_file; read with `datasets`, memory-mapped"})
    dataset_config_name: Optional[str] = dataclasses.field(default=None, metadata={"help": "the dataset's config"})
    train_split: str = dataclasses.field(default="train", metadata={"help": "--dataset_name's training split"})
    validation_split: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "--dataset_name's evaluation split (e.g. validation)"})
    text_column: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "input text column (dotted names reach into nested records)"})
    summary_column: Optional[str] = dataclasses.field(default=None, metadata={"help": "seq2seq target column"})
    text_pair_column: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "classify: second text of a pair (e.g. hypothesis)"})
    label_column: Optional[str] = dataclasses.field(default=None, metadata={"help": "classify: label column"})
    question_column: Optional[str] = dataclasses.field(default=None, metadata={"help": "qa: question column"})
    context_column: Optional[str] = dataclasses.field(default=None, metadata={"help": "qa: context column"})
    answer_column: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "qa: answers column {'text': [...], 'answer_start': [...]}"})
    max_source_length: int = dataclasses.field(default=1024, metadata={"help": "seq2seq/denoise input tokens"})
    max_target_length: int = dataclasses.field(default=128, metadata={"help": "seq2seq target tokens"})
    val_max_target_length: Optional[int] = dataclasses.field(
        default=None, metadata={"help": "generated tokens at evaluation (default: max_target_length)"})
    max_seq_length: int = dataclasses.field(default=384, metadata={"help": "classify/qa input tokens"})
    max_train_samples: Optional[int] = dataclasses.field(default=None, metadata={"help": "use the first N examples"})
    max_eval_samples: Optional[int] = dataclasses.field(default=None, metadata={"help": "evaluate the first N"})
    num_labels: Optional[int] = dataclasses.field(default=None, metadata={"help": "classify: number of labels"})
    problem_type: Optional[str] = dataclasses.field(
        default=None,
        metadata={"help": "classify: single_label_classification, multi_label_classification or regression"})
    # --- denoising noise (defaults: BART pre-training) ------------------------------------------
    mask_ratio: float = dataclasses.field(default=0.3, metadata={"help": "fraction of words masked in spans"})
    random_ratio: float = dataclasses.field(default=0.1, metadata={"help": "fraction of masks that are random tokens"})
    poisson_lambda: float = dataclasses.field(default=3.0, metadata={"help": "mean masked span length (words)"})
    permute_sentence_ratio: float = dataclasses.field(default=1.0, metadata={"help": "fraction of sentences shuffled"})
    deletion_ratio: float = dataclasses.field(default=0.0, metadata={"help": "fraction of tokens deleted"})
    insert_ratio: float = dataclasses.field(default=0.0, metadata={"help": "masks inserted, per token"})
    rotate_ratio: float = dataclasses.field(default=0.0, metadata={"help": "probability of rotating a document"})
    # --- optimisation ---------------------------------------------------------------------------
    per_device_train_batch_size: int = dataclasses.field(
        default=8, metadata={"help": "examples per device per micro-batch"})
    per_device_eval_batch_size: int = dataclasses.field(
        default=8, metadata={"help": "examples per device at evaluation"})
    gradient_accumulation_steps: int = dataclasses.field(default=1, metadata={"help": "micro-batches per update"})
    learning_rate: float = dataclasses.field(default=5e-5, metadata={"help": "peak learning rate"})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    adam_beta1: float = dataclasses.field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = dataclasses.field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = dataclasses.field(default=1e-8, metadata={"help": "AdamW epsilon"})
    max_grad_norm: float = dataclasses.field(default=1.0, metadata={"help": "global-norm clipping (0: none)"})
    lr_scheduler_type: str = dataclasses.field(default="linear", metadata={"help": "linear, cosine or constant"})
    warmup_steps: int = dataclasses.field(default=0, metadata={"help": "linear warmup steps"})
    num_train_epochs: float = dataclasses.field(default=3.0, metadata={"help": "epochs (when max_steps <= 0)"})
    max_steps: int = dataclasses.field(default=-1, metadata={"help": "updates to run; overrides num_train_epochs"})
    label_smoothing_factor: float = dataclasses.field(default=0.0, metadata={"help": "label smoothing epsilon"})
    seed: int = dataclasses.field(default=42, metadata={"help": "seed of init, data order, noise and dropout"})
    # --- several processes (see bart_jax.parallel.distributed) ------------------------------------
    coordinator_address: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "host:port of process 0, for runs over several processes; on Cloud TPU "
                                        "pods, SLURM and Open MPI it is found by itself"})
    num_processes: Optional[int] = dataclasses.field(default=None, metadata={"help": "processes in the run"})
    process_id: Optional[int] = dataclasses.field(default=None, metadata={"help": "this process, 0 .. N-1"})
    mesh: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "shard over all devices: data, fsdp, tensor, fsdp+tensor, ... "
                                        "(bart_jax.parallel presets); default: one device"})
    # --- evaluation -----------------------------------------------------------------------------
    eval_steps: Optional[int] = dataclasses.field(
        default=None, metadata={"help": "evaluate every N updates (always at the end when there is validation data)"})
    predict_with_generate: bool = dataclasses.field(
        default=False, metadata={"help": "seq2seq: generate at evaluation and report ROUGE"})
    num_beams: Optional[int] = dataclasses.field(
        default=None, metadata={"help": "beams for generation at evaluation (default: the model's)"})
    max_answer_length: int = dataclasses.field(default=30, metadata={"help": "qa: longest answer in tokens"})
    version_2_with_negative: bool = dataclasses.field(
        default=False, metadata={"help": "qa: some questions have no answer (SQuAD 2.0)"})
    null_score_diff_threshold: float = dataclasses.field(
        default=0.0, metadata={"help": "qa: predict no answer when its score beats the best span by this"})
    # --- best model and early stopping (as the Hugging Face Trainer) ---------------------------
    metric_for_best_model: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "evaluation metric that picks the best checkpoint, e.g. loss, rougeL, "
                                        "accuracy (the eval_ prefix is optional); its checkpoint outlives "
                                        "save_total_limit (default: loss when load_best_model_at_end or "
                                        "early_stopping_patience is set)"})
    greater_is_better: Optional[bool] = dataclasses.field(
        default=None, metadata={"help": "whether a larger metric_for_best_model is better "
                                        "(default: true unless its name ends in loss)"})
    load_best_model_at_end: bool = dataclasses.field(
        default=False, metadata={"help": "export the best checkpoint's weights at the end instead of the last"})
    early_stopping_patience: Optional[int] = dataclasses.field(
        default=None, metadata={"help": "stop after this many evaluations in a row without improvement"})
    early_stopping_threshold: float = dataclasses.field(
        default=0.0, metadata={"help": "improvement of metric_for_best_model needed to reset the patience"})
    # --- output ---------------------------------------------------------------------------------
    overwrite_output_dir: bool = dataclasses.field(
        default=False, metadata={"help": "replace another run's checkpoints in output_dir"})
    logging_steps: int = dataclasses.field(default=10, metadata={"help": "log metrics every N updates"})
    save_steps: int = dataclasses.field(default=500, metadata={"help": "checkpoint every N updates"})
    save_total_limit: Optional[int] = dataclasses.field(default=3, metadata={"help": "checkpoints kept"})
    async_checkpointing: bool = dataclasses.field(default=True, metadata={"help": "save in the background"})
    report_to: list[str] = dataclasses.field(
        default_factory=lambda: ["none"],
        metadata={"help": "where metrics go besides metrics.jsonl: none, all, or some of "
                          f"{', '.join(INTEGRATIONS)} (several allowed)"})
    profile_steps: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "START:STOP: write a jax.profiler trace of updates START to STOP "
                                        "into output_dir/profile"})
    disable_tqdm: bool = dataclasses.field(default=False, metadata={"help": "no progress bar"})

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first inconsistent option."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {', '.join(REMAT_POLICIES)}, got {self.remat_policy!r}")
        self.report_to = _report_to_names(self.report_to)
        self.profile_range()
        if self.metric_for_best_model == "":
            self.metric_for_best_model = None
        if self.early_stopping_patience is not None and self.early_stopping_patience <= 0:
            raise ValueError(f"early_stopping_patience must be positive when given, got {self.early_stopping_patience}")
        if self.early_stopping_threshold < 0:
            raise ValueError(f"early_stopping_threshold must not be negative, got {self.early_stopping_threshold}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps", "max_source_length", "max_target_length", "max_seq_length",
                     "max_answer_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_steps", "max_train_samples", "max_eval_samples", "num_labels", "num_beams", "num_processes",
                     "val_max_target_length", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive when given, got {value}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set max_steps or a positive num_train_epochs")

    def check_complete(self) -> None:
        if not self.output_dir:
            raise ValueError("--output_dir is required")
        if bool(self.train_file) == bool(self.dataset_name):
            raise ValueError("pass exactly one of --train_file and --dataset_name")
        if self.validation_file and self.validation_split:
            raise ValueError("pass --validation_file or --validation_split (of --dataset_name), not both")
        if self.validation_split and not self.dataset_name:
            raise ValueError("--validation_split names a split of --dataset_name: pass --dataset_name")
        if self.task == "denoise" and self.max_steps <= 0:
            raise ValueError("denoising packs documents into blocks as it streams them, so an epoch's number of "
                             "updates is unknown in advance: pass --max_steps")
        if bool(self.model_name_or_path) == bool(self.config_name):
            raise ValueError("pass exactly one of --model_name_or_path (fine-tune) and --config_name (from scratch)")
        self.validate()
        if self.best_model_metric() and not self.has_validation_data():
            wanted = ("--load_best_model_at_end" if self.load_best_model_at_end else
                      "--early_stopping_patience" if self.early_stopping_patience else "--metric_for_best_model")
            raise ValueError(f"{wanted} needs evaluations: pass --validation_file or --validation_split")
        if self.early_stopping_patience and not self.eval_steps:
            raise ValueError("--early_stopping_patience counts evaluations: pass --eval_steps")
        self.check_output_dir()

    def has_validation_data(self) -> bool:
        return bool(self.validation_file or self.validation_split)

    def check_output_dir(self) -> None:
        """Refuses an output_dir that is a file or lies under one, before any work."""
        path = os.path.abspath(self.output_dir)
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            where = "is" if path == os.path.abspath(self.output_dir) else f"lies under {path}, which is"
            raise ValueError(f"--output_dir {self.output_dir} {where} a file, not a directory; "
                             f"choose another --output_dir")

    def best_model_metric(self) -> Optional[str]:
        """The evaluation metric ("eval_<name>") that picks the best checkpoint, or None: none is tracked."""
        name = self.metric_for_best_model
        if name is None and (self.load_best_model_at_end or self.early_stopping_patience):
            name = "loss"
        if name is None:
            return None
        return name if name.startswith("eval_") else f"eval_{name}"

    def best_is_greater(self) -> bool:
        """Whether a larger best_model_metric() is better: greater_is_better, else not a loss."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not (self.metric_for_best_model or "loss").endswith("loss")

    def profile_range(self) -> Optional[tuple[int, int]]:
        """(first, last) update of profile_steps "START:STOP", or None."""
        if not self.profile_steps:
            return None
        parts = str(self.profile_steps).split(":")
        try:
            first, last = (int(part) for part in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            first = last = None
        if first is None or not 1 <= first <= last:
            raise ValueError(f"profile_steps must be START:STOP with 1 <= START <= STOP, got {self.profile_steps!r}")
        return first, last

    def column(self, name: str) -> Optional[str]:
        """The column option `name`, or the task's default column."""
        return getattr(self, name) or DEFAULT_COLUMNS[self.task].get(name)

    def run_identity(self) -> dict:
        """The options that define the training trajectory (paths made absolute)."""
        identity = {}
        for field in dataclasses.fields(self):
            if field.name in RESUMABLE_CHANGES:
                continue
            value = getattr(self, field.name)
            if field.name in PATH_OPTIONS and value and os.path.exists(value):
                value = os.path.abspath(value)
            identity[field.name] = value
        return identity


# Options that may differ when a run is resumed: they do not change what is trained.
RESUMABLE_CHANGES = (
    "output_dir", "overwrite_output_dir", "validation_file", "per_device_eval_batch_size", "max_eval_samples",
    "eval_steps", "predict_with_generate", "num_beams", "val_max_target_length", "max_answer_length",
    "version_2_with_negative", "null_score_diff_threshold", "logging_steps", "save_steps", "save_total_limit",
    "async_checkpointing", "report_to", "disable_tqdm", "remat_policy", "profile_steps", "metric_for_best_model",
    "greater_is_better", "load_best_model_at_end", "early_stopping_patience", "early_stopping_threshold",
    "validation_split", "coordinator_address", "num_processes", "process_id",
)
PATH_OPTIONS = ("model_name_or_path", "config_name", "tokenizer_name", "train_file", "dataset_name")


def _report_to_names(value) -> list[str]:
    """report_to as a list of names: "tensorboard,wandb", ["tensorboard", "wandb"], "none", "all"."""
    names = [name for item in ([value] if isinstance(value, str) else list(value or ()))
             for name in re.split(r"[,\s]+", str(item)) if name]
    unknown = [name for name in names if name not in ("none", "all", *INTEGRATIONS)]
    if unknown:
        raise ValueError(f"report_to must be none, all or some of {', '.join(INTEGRATIONS)}, got {unknown[0]!r}")
    if not names or names == ["none"]:
        return ["none"]
    if "none" in names:
        raise ValueError(f"report_to none cannot be combined with other names, got {names}")
    return list(dict.fromkeys(names))


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "y"):
        return True
    if lowered in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _field_type(field: dataclasses.Field) -> type:
    hint = typing.get_type_hints(TrainingArguments)[field.name]
    arguments = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return arguments[0] if arguments else hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train BART: denoising pre-training or fine-tuning (seq2seq, classification, QA).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML recipe (e.g. configs/train/xsum.yaml); flags override it")
    for field in dataclasses.fields(TrainingArguments):
        kind = _field_type(field)
        if kind is bool:
            parser.add_argument(f"--{field.name}", type=_parse_bool, nargs="?", const=True, default=field.default,
                                help=field.metadata["help"])
        elif typing.get_origin(typing.get_type_hints(TrainingArguments)[field.name]) is list:
            parser.add_argument(f"--{field.name}", nargs="+", default=field.default_factory(),
                                help=field.metadata["help"])
        else:
            parser.add_argument(f"--{field.name}", type=kind, default=field.default, help=field.metadata["help"])
    return parser


def parse_arguments(argv: Optional[Sequence[str]] = None) -> TrainingArguments:
    """Options from a recipe (`--config`) overridden by the command line."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        recipe = recipes.load_recipe(known.config, {field.name for field in dataclasses.fields(TrainingArguments)})
        parser.set_defaults(**recipe)
    namespace = vars(parser.parse_args(argv))
    namespace.pop("config")
    arguments = TrainingArguments(**namespace)
    arguments.check_complete()
    return arguments
