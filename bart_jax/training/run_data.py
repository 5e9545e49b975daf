"""What a run trains and evaluates on, from `--train_file` or `--dataset_name`.

Training examples of the seq2seq and denoising tasks stream from a random-access source
(`training.sources`) through the grain pipeline (`training.pipeline`): nothing is read or
tokenised before the batch that needs it, so memory does not grow with the corpus, and
`--max_train_samples` reads nothing past the first N records. Classification and QA read their
training split whole: the label scheme needs every label, and QA's windows every context (their
corpora are fine-tuning sets: GLUE, SQuAD). Validation splits are read whole by every task.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import grain

from bart_jax.config import BartConfig
from bart_jax.training import features, noise, qa
from bart_jax.training.arguments import TrainingArguments
from bart_jax.training.batching import task_example
from bart_jax.training.data import column_values
from bart_jax.training.pipeline import PackingConfig, example_source
from bart_jax.training.sources import hub_source, open_source

STREAMED_TASKS = ("seq2seq", "denoise")
# The validation inputs of denoising get their own noise: the training seed plus this.
EVALUATION_SEED_OFFSET = 1


def training_source(arguments: TrainingArguments) -> Any:
    """The training split as a random-access source (at most max_train_samples records)."""
    if arguments.dataset_name:
        return hub_source(arguments.dataset_name, arguments.dataset_config_name, arguments.train_split,
                          arguments.max_train_samples)
    return open_source(arguments.train_file, arguments.max_train_samples)


def training_source_name(arguments: TrainingArguments) -> str:
    return arguments.train_file or f"{arguments.dataset_name}[{arguments.train_split}]"


def validation_records(arguments: TrainingArguments) -> Optional[list]:
    """The validation split's first max_eval_samples records, or None without one."""
    if arguments.validation_split:
        source = hub_source(arguments.dataset_name, arguments.dataset_config_name, arguments.validation_split,
                            arguments.max_eval_samples)
    elif arguments.validation_file:
        source = open_source(arguments.validation_file, arguments.max_eval_samples)
    else:
        return None
    return records_of(source)


def records_of(source: Any) -> list:
    """Every record of a source, read whole."""
    return [source[i] for i in range(len(source))]


def label_scheme(arguments: TrainingArguments, records: list, base: BartConfig) -> features.LabelScheme:
    """The classification labels of the training records (names from `base` where it has them)."""
    labels = column_values(records, arguments.column("label_column"), training_source_name(arguments))
    names = [name for _, name in base.id2label]
    default_names = all(name == f"LABEL_{i}" for i, name in enumerate(names))
    return features.infer_label_scheme([label for label in labels if label not in (None, "")],
                                       arguments.problem_type, arguments.num_labels,
                                       () if default_names else names)


def noise_config(arguments: TrainingArguments) -> noise.NoiseConfig:
    return noise.NoiseConfig(arguments.mask_ratio, arguments.random_ratio, arguments.poisson_lambda,
                             arguments.permute_sentence_ratio, arguments.deletion_ratio, arguments.insert_ratio,
                             arguments.rotate_ratio)


def build_task_data(arguments: TrainingArguments, records: list, tokenizer, scheme, seed: int,
                    source: str) -> features.TaskData:
    """The features of one split for `arguments.task`, read whole."""
    task, column = arguments.task, arguments.column
    if task == "seq2seq":
        return features.seq2seq_data(records, tokenizer, column("text_column"), column("summary_column"),
                                     arguments.max_source_length, arguments.max_target_length, source)
    if task == "denoise":
        return features.denoising_data(records, tokenizer, column("text_column"), arguments.max_source_length,
                                       noise_config(arguments), seed, source)
    if task == "classify":
        return features.classification_data(records, tokenizer, column("text_column"), column("text_pair_column"),
                                            column("label_column"), arguments.max_seq_length, scheme, source)
    return qa.qa_data(records, tokenizer, column("question_column"), column("context_column"),
                      column("answer_column"), arguments.max_seq_length, source)


@dataclasses.dataclass
class TrainingExamples:
    """The training examples as the pipeline reads them.

    examples: example i of an epoch (None: empty, skipped); num_examples: how many an epoch
    holds (denoising: documents, packed into blocks as they stream); padded_lengths: the batch
    length of each varying column; packing: set for denoising.
    """

    examples: grain.MapDataset
    num_examples: int
    padded_lengths: dict[str, int]
    packing: Optional[PackingConfig] = None


def training_examples(arguments: TrainingArguments, source: Any, records: Optional[list], tokenizer,
                      scheme: Optional[features.LabelScheme]) -> TrainingExamples:
    """The task's training examples: streamed from `source` (seq2seq, denoising) or made from
    `records` read whole (classification, QA)."""
    name, column = training_source_name(arguments), arguments.column
    if arguments.task == "seq2seq":
        featurize = features.seq2seq_featurizer(tokenizer, column("text_column"), column("summary_column"),
                                                arguments.max_source_length, arguments.max_target_length, name)
        return TrainingExamples(example_source(source, featurize), len(source),
                                {"input_ids": arguments.max_source_length, "labels": arguments.max_target_length})
    if arguments.task == "denoise":
        packing = PackingConfig(arguments.max_source_length, tokenizer.bos_token_id, tokenizer.eos_token_id,
                                noise_config(arguments),
                                noise.NoiseVocabulary.from_vocab(tokenizer.backend_tokenizer.get_vocab()))
        featurize = features.document_featurizer(tokenizer, column("text_column"), name)
        length = arguments.max_source_length
        return TrainingExamples(example_source(source, featurize), len(source),
                                {"input_ids": length, "labels": length}, packing)
    data = build_task_data(arguments, records, tokenizer, scheme, arguments.seed, name)
    if not len(data):
        raise ValueError(f"{name} has no usable examples ({data.stats.describe('training data')})")
    examples = grain.MapDataset.range(len(data)).map(lambda index: task_example(data, index))
    return TrainingExamples(examples, len(data), dict(data.padded_lengths))
