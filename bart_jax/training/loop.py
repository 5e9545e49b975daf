"""The training loop: data, model, optimizer, checkpoints, evaluation, logging and export.

Resuming: when `output_dir` holds checkpoints of the same run (same run settings), the newest
one is restored — params, optimizer state, step, dropout key and input pipeline position — and training
continues with the next unseen batch, so an interrupted run ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from bart_jax.checkpoints.hub import resolve_model_directory
from bart_jax.config import BartConfig
from bart_jax.model.kernels import settled
from bart_jax.model.losses import IGNORE_INDEX
from bart_jax.parallel.distributed import global_batch, process_rows, to_host
from bart_jax.parallel.mesh import preset_mesh
from bart_jax.training import checkpointing, features
from bart_jax.training.arguments import RESUMABLE_CHANGES, TrainingArguments
from bart_jax.training.evaluation import evaluate
from bart_jax.training.models import (
    HF_MODEL_DIR,
    MODEL_DIR,
    TrainingModel,
    config_from_name,
    export_model,
    load_training_model,
    parse_config_overrides,
)
from bart_jax.training.objectives import TASK_HEADS, make_objective
from bart_jax.training.optimizer import learning_rate_schedule, make_optimizer, trainable_mask
from bart_jax.training.pipeline import training_dataset
from bart_jax.training.reporting import (
    METRICS_FILE,
    PROFILE_DIR,
    TENSORBOARD_DIR,
    MetricsLog,
    StepProfiler,
    resolve_integrations,
)
from bart_jax.training.run_data import (
    EVALUATION_SEED_OFFSET,
    STREAMED_TASKS,
    TrainingExamples,
    build_task_data,
    label_scheme,
    records_of,
    training_examples,
    training_source,
    training_source_name,
    validation_records,
)
from bart_jax.training.selection import PROGRESS_KEY, BestModelTracker, checkpoint_params, prune_checkpoints
from bart_jax.training.train_step import (
    compile_eval_step,
    compile_train_step,
    make_eval_step,
    make_train_step,
)

logger = logging.getLogger(__name__)

# What a run writes in output_dir (overwrite_output_dir deletes the first three).
OUTPUT_NAMES = (checkpointing.CHECKPOINT_DIR, checkpointing.RUN_CONFIG_FILE, METRICS_FILE, TENSORBOARD_DIR,
                PROFILE_DIR, MODEL_DIR, HF_MODEL_DIR)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient."""


def _is_within(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_data_outside_outputs(arguments: TrainingArguments) -> None:
    """Refuses an output_dir where the run would overwrite or delete its own data: a data file (or
    saved dataset directory) where the run writes in output_dir (OUTPUT_NAMES)."""
    output_dir = arguments.output_dir
    for option in ("train_file", "validation_file"):
        path = getattr(arguments, option)
        if not path:
            continue
        for name in OUTPUT_NAMES:
            if _is_within(path, os.path.join(output_dir, name)):
                raise ValueError(f"--{option} {path} lies where the run writes in --output_dir "
                                 f"({os.path.join(output_dir, name)}); choose another --output_dir")


def _base_config(arguments: TrainingArguments) -> BartConfig:
    if arguments.model_name_or_path:
        return BartConfig.from_pretrained(resolve_model_directory(arguments.model_name_or_path))
    return config_from_name(arguments.config_name)[0]


def _check_lengths(arguments: TrainingArguments, config: BartConfig) -> None:
    lengths = {"seq2seq": {"max_source_length": arguments.max_source_length,
                           "max_target_length": arguments.max_target_length},
               # Denoising targets are the clean inputs: max_source_length bounds both.
               "denoise": {"max_source_length": arguments.max_source_length}}.get(
        arguments.task, {"max_seq_length": arguments.max_seq_length})
    for name, value in lengths.items():
        if value > config.max_position_embeddings:
            raise ValueError(f"{name} ({value}) exceeds the model's max_position_embeddings "
                             f"({config.max_position_embeddings})")


def _stack_micro_batches(batch: dict[str, np.ndarray], accumulation_steps: int) -> dict[str, np.ndarray]:
    """[accumulation * micro, ...] -> [accumulation, micro, ...]."""
    return {name: value.reshape(accumulation_steps, -1, *value.shape[1:]) for name, value in batch.items()}


def _count_tokens(batch: dict[str, np.ndarray]) -> int:
    tokens = int(batch["attention_mask"].sum())
    if "labels" in batch and batch["labels"].ndim == 2 and np.issubdtype(batch["labels"].dtype, np.integer):
        tokens += int(np.sum(batch["labels"] != IGNORE_INDEX))
    return tokens


class _Window:
    """Per-step metrics since the last log (left on the device until logged), and non-finite checks."""

    def __init__(self):
        self.steps: list[tuple[int, dict]] = []
        self.tokens = 0
        self.start_time = time.perf_counter()

    def add(self, step: int, metrics: dict, tokens: int) -> None:
        self.steps.append((step, metrics))
        self.tokens += tokens

    def summary(self) -> dict[str, float]:
        """Means over the window; raises NonFiniteLossError at the first bad step."""
        fetched = jax.device_get([metrics for _, metrics in self.steps])
        for (step, _), values in zip(self.steps, fetched):
            if not values["finite"]:
                raise NonFiniteLossError(f"the loss or gradient became {values['loss']} at step {step}")
        elapsed = max(time.perf_counter() - self.start_time, 1e-9)
        summary = {name: float(np.mean([values[name] for values in fetched])) for name in ("loss", "grad_norm")}
        summary["learning_rate"] = float(fetched[-1]["learning_rate"])
        summary["tokens_per_second"] = self.tokens / elapsed
        self.steps, self.tokens, self.start_time = [], 0, time.perf_counter()
        return summary


@dataclasses.dataclass
class _Setup:
    """What a run trains on: the model, the data and the number of steps."""

    model: TrainingModel
    train: TrainingExamples
    eval_data: Optional[features.TaskData]
    batch_size: int  # examples per update, over all devices and micro-batches
    steps_per_epoch: Optional[int]  # None for denoising: documents are packed as they stream
    total_steps: int


def _set_up(arguments: TrainingArguments, batch_size: int, init_key: jax.Array) -> _Setup:
    """Opens the data, loads the model and counts the steps."""
    task = arguments.task
    source = training_source(arguments)
    records = None if task in STREAMED_TASKS else records_of(source)
    eval_records = validation_records(arguments)
    config_changes = parse_config_overrides(arguments.config_overrides)
    scheme = None
    if task == "classify":
        scheme = label_scheme(arguments, records, _base_config(arguments))
        config_changes.update(id2label=dict(enumerate(scheme.names)), problem_type=scheme.problem_type)
    model = load_training_model(arguments.model_name_or_path, arguments.config_name, TASK_HEADS[task],
                                config_changes, arguments.dtype, arguments.tokenizer_name, init_key,
                                arguments.remat_policy, arguments.scan_layers)
    _check_lengths(arguments, model.config)
    train_examples = training_examples(arguments, source, records, model.tokenizer, scheme)
    name = training_source_name(arguments)
    logger.info("training data: %s, %d %s", name, train_examples.num_examples,
                "documents" if task == "denoise" else "examples")
    eval_data = None
    if eval_records is not None:
        eval_data = build_task_data(arguments, eval_records, model.tokenizer, scheme,
                                    arguments.seed + EVALUATION_SEED_OFFSET,
                                    arguments.validation_file or arguments.validation_split)
        logger.info(eval_data.stats.describe("validation data"))
    steps_per_epoch = None if task == "denoise" else train_examples.num_examples // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{name} has {train_examples.num_examples} examples, fewer than one batch of {batch_size}")
    total_steps = (arguments.max_steps if arguments.max_steps > 0
                   else math.ceil(arguments.num_train_epochs * steps_per_epoch))
    return _Setup(model, train_examples, eval_data, batch_size, steps_per_epoch, total_steps)


def batch_rows(batch_size: int, accumulation_steps: int, mesh: Optional[Any]) -> list[int]:
    """The rows of each global batch ([accumulation * micro]) that this process builds: its
    devices' rows of every micro-batch (all rows without a mesh)."""
    if mesh is None:
        return list(range(batch_size))
    micro = batch_size // accumulation_steps
    rows = process_rows(micro, mesh)
    return [step * micro + row for step in range(accumulation_steps) for row in range(rows.start, rows.stop)]


def train(arguments: TrainingArguments) -> dict[str, Any]:
    """Runs (or resumes) training as `arguments` say; returns the last logged and evaluation metrics."""
    arguments.check_complete()
    batch_size = arguments.per_device_train_batch_size * jax.device_count() * arguments.gradient_accumulation_steps
    # The data position counts batches: resuming needs the same number of examples per batch.
    identity = {**arguments.run_identity(), "train_batch_size": batch_size}
    check_data_outside_outputs(arguments)
    resolve_integrations(arguments.report_to)  # a missing package is named before any work
    try:
        checkpointing.prepare_output_dir(arguments.output_dir, identity, arguments.overwrite_output_dir,
                                         RESUMABLE_CHANGES)
    except OSError as error:  # before any data or model is read: one line naming the path
        raise ValueError(f"cannot write --output_dir {arguments.output_dir}: {error.strerror or error} "
                         f"({error.filename})") from None
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(arguments.seed))
    setup = _set_up(arguments, batch_size, init_key)
    model = setup.model

    schedule = learning_rate_schedule(arguments.learning_rate, setup.total_steps, arguments.warmup_steps,
                                      arguments.lr_scheduler_type)
    optimizer = make_optimizer(model.params, schedule, arguments.weight_decay, arguments.adam_beta1,
                               arguments.adam_beta2, arguments.adam_epsilon, arguments.max_grad_norm)
    # Several devices and no --mesh: data parallelism over all of them (the global batch is
    # per-device batch x device count, and must not all run on the first device).
    mesh_name = arguments.mesh or ("data" if jax.device_count() > 1 else None)
    mesh = preset_mesh(mesh_name) if mesh_name else None
    if mesh is not None and not arguments.mesh:
        logger.info("%d devices: training data-parallel over all of them (--mesh data)", jax.device_count())
    if mesh is not None:
        logger.info("mesh %s over %d devices of %d processes", dict(mesh.shape), jax.device_count(),
                    jax.process_count())
    # The kernels of the platform the step runs on, settled once: "auto" would trace both.
    model = dataclasses.replace(model, module=settled(model.module, mesh=mesh))
    objective = make_objective(model.module, arguments.task, arguments.label_smoothing_factor)
    step_function = make_train_step(objective, optimizer, trainable_mask(model.params), schedule)
    train_step, state = compile_train_step(step_function, model.params, optimizer, mesh)
    eval_step = compile_eval_step(make_eval_step(objective), state.params, mesh)

    tracker = BestModelTracker.for_arguments(arguments)
    # With a best checkpoint to keep, the save limit is kept by prune_checkpoints instead of orbax.
    checkpointer = checkpointing.Checkpointer(arguments.output_dir,
                                              arguments.save_total_limit if tracker is None else None,
                                              arguments.async_checkpointing)
    # This process's rows of every global batch, read, tokenised and packed as training goes.
    rows = batch_rows(batch_size, arguments.gradient_accumulation_steps, mesh)
    batches = iter(training_dataset(setup.train.examples, rows, batch_size, arguments.seed,
                                    setup.train.padded_lengths, model.config.pad_token_id, setup.train.packing))
    # The newest checkpoint that verifies: damaged newer ones are skipped with a warning.
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        latest, state, progress, data_state = restored
        batches.set_state(data_state)
        dropout_key = checkpointing.key_from_json(progress["rng"])
        if tracker is not None:
            tracker.restore(progress.get(PROGRESS_KEY))
        logger.info("resumed from the checkpoint of step %d", latest)
    step = int(state.step)
    log = MetricsLog(arguments.output_dir, arguments.report_to, config=dataclasses.asdict(arguments))
    log.truncate_after(step)

    def run_evaluation() -> dict[str, float]:
        return evaluate(
            arguments.task, eval_step, state.params, setup.eval_data, model,
            arguments.per_device_eval_batch_size * jax.device_count(),
            predict_with_generate=arguments.predict_with_generate, generation_options=_generation_options(arguments),
            max_answer_length=arguments.max_answer_length, allow_no_answer=arguments.version_2_with_negative,
            null_score_threshold=arguments.null_score_diff_threshold, mesh=mesh,
        )

    logger.info("training %s for %d steps of %d examples (%s) from step %d", model.head, setup.total_steps,
                batch_size, f"{setup.steps_per_epoch} per epoch" if setup.steps_per_epoch else "packed blocks", step)
    last_logged: dict[str, Any] = {}
    last_evaluation_step = None
    stopped = tracker is not None and tracker.stopped
    if stopped:
        logger.info("the run stopped early at step %d: not training further", step)
    window = _Window()
    profiler = StepProfiler(arguments.output_dir, arguments.profile_range())
    progress_bar = tqdm(total=setup.total_steps, initial=step, desc="training",
                        disable=arguments.disable_tqdm or jax.process_index() != 0)
    # Tokens of this process's rows, scaled to the global batch.
    global_share = batch_size / len(rows)

    def training_entry() -> dict[str, Any]:
        # Also before every save: only states with finite losses are saved.
        entry = window.summary()
        if setup.steps_per_epoch:
            entry["epoch"] = step / setup.steps_per_epoch
        progress_bar.set_postfix(loss=f"{entry['loss']:.4f}")
        return entry

    try:
        while step < setup.total_steps and not stopped:
            batch = next(batches)
            tokens = round(_count_tokens(batch) * global_share)
            batch = _stack_micro_batches(batch, arguments.gradient_accumulation_steps)
            if mesh is not None:  # global arrays from every process's rows
                batch = global_batch(batch, mesh, batch_axis=1)
            profiler.before_step(step + 1)
            state, step_metrics = train_step(state, batch, dropout_key)
            step += 1
            profiler.after_step(step, state)
            window.add(step, step_metrics, tokens)
            progress_bar.update(1)
            is_last = step == setup.total_steps
            is_save = step % arguments.save_steps == 0 or is_last
            entry: dict[str, Any] = {}
            if step % arguments.logging_steps == 0 or is_save:
                entry.update(training_entry())
            eval_step_due = bool(arguments.eval_steps) and step % arguments.eval_steps == 0
            if setup.eval_data is not None and (is_last or eval_step_due):
                evaluation = run_evaluation()
                entry.update(evaluation)
                last_evaluation_step = step
                if tracker is not None:
                    verdict = tracker.observe(step, evaluation)
                    stopped = verdict.stop
                    if (verdict.improved or verdict.stop) and not is_save:
                        # The best state is saved (and kept); so is the state an early stop ends with.
                        is_save = True
                        entry = entry if "loss" in entry else {**training_entry(), **entry}
            if entry:
                log.write(step, entry)
                last_logged = entry
            if is_save:
                progress = {"rng": checkpointing.key_to_json(dropout_key)}
                if tracker is not None:
                    progress[PROGRESS_KEY] = tracker.to_dict()
                checkpointer.save(step, state, progress, batches.get_state())
                if tracker is not None and jax.process_index() == 0:
                    prune_checkpoints(checkpointer.directory, arguments.save_total_limit, step, [tracker.best_step])
    except NonFiniteLossError as error:
        checkpointer.wait()
        last = checkpointer.latest_step()
        kept = (f"the last good checkpoint is step {last} in {checkpointer.directory}" if last is not None
                else "no checkpoint was saved")
        raise NonFiniteLossError(f"{error}; stopping ({kept}). Try a lower learning rate or float32.") from None
    finally:
        batches.close()  # stops the pipeline's prefetch thread
        profiler.stop()
        progress_bar.close()
        # Also on an interruption: let a background save finish so that it is not lost.
        checkpointer.close()

    results = dict(last_logged)
    if setup.eval_data is not None and last_evaluation_step != step:  # a run resumed at its end
        evaluation = run_evaluation()
        log.write(step, evaluation)
        results.update(evaluation)
    params = state.params
    if tracker is not None:
        if jax.process_index() == 0:
            prune_checkpoints(checkpointer.directory, arguments.save_total_limit, step, [tracker.best_step])
        results.update(best_step=tracker.best_step, best_metric=tracker.best_value)
        if arguments.load_best_model_at_end and tracker.best_step is not None:
            if tracker.best_step != step:
                params = checkpoint_params(arguments.output_dir, tracker.best_step, state)
            results.update(tracker.best_metrics)
            logger.info("exporting the best model, of step %d (%s %.6g)", tracker.best_step, tracker.metric,
                        tracker.best_value)
    log.close()
    if jax.process_count() > 1:  # parameters split over processes, gathered whole on each
        params = to_host(params)
    if jax.process_index() == 0:
        model_dir, hf_dir = export_model(model, params, arguments.output_dir)
        logger.info("saved the trained model to %s and %s", model_dir, hf_dir)
    results["step"] = step
    return results


def _generation_options(arguments: TrainingArguments) -> dict[str, Any]:
    options: dict[str, Any] = {"max_length": arguments.val_max_target_length or arguments.max_target_length}
    if arguments.num_beams:
        options["num_beams"] = arguments.num_beams
    return options

