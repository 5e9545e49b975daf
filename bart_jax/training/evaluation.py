"""Evaluation over a validation split: the loss, and the task's metrics on the model's outputs
(ROUGE of generated summaries, classification accuracy/F1, QA exact match/F1)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import numpy as np

from bart_jax import parallel
from bart_jax.generation import generate, resolve_generation_config
from bart_jax.parallel.distributed import to_host
from bart_jax.training import metrics, qa
from bart_jax.training.batching import collate, evaluation_batches
from bart_jax.training.features import TaskData
from bart_jax.training.models import TrainingModel

# The validation inputs of denoising get their own noise, fixed for the whole run.
EVALUATION_EPOCH = 0


def evaluate(task: str, eval_step: Callable, params: Any, data: TaskData, model: TrainingModel, batch_size: int,
             predict_with_generate: bool = False, generation_options: Optional[dict] = None,
             max_answer_length: int = 30, allow_no_answer: bool = False,
             null_score_threshold: float = 0.0, mesh: Optional[Any] = None) -> dict[str, float]:
    """Metrics named "eval_<name>" over all of `data` (the last batch padded with masked rows).
    With a mesh, generation runs sharded like the train step (`bart_jax.parallel.jit_generate`)."""
    loss_sum, weight = 0.0, 0.0
    outputs: dict[str, list] = {}
    predictions: list[str] = []
    generated_lengths: list[int] = []
    pad_token_id = model.config.pad_token_id
    sharded_generate = None
    if predict_with_generate and task == "seq2seq" and mesh is not None:
        config = resolve_generation_config(model.module, model.generation_config, **(generation_options or {}))
        sharded_generate = parallel.jit_generate(model.module, mesh, jax.tree.map(lambda x: x.sharding, params), config)
    for indices in evaluation_batches(len(data), batch_size):
        batch = collate(data, indices, EVALUATION_EPOCH, pad_token_id)
        batch = {name: np.asarray(value, np.int32) if name in ("input_ids", "attention_mask") else value
                 for name, value in batch.items()}
        if mesh is not None and jax.process_count() > 1:
            # Every process holds the whole validation batch: placed shard by shard here, since
            # JAX refuses host arrays for sharded inputs when there are several processes.
            batch = jax.device_put(batch, parallel.batch_sharding(mesh))
        result = eval_step(params, batch)
        loss_sum += float(result["loss_sum"])
        weight += float(result["weight"])
        real = indices >= 0
        for name in ("logits", "start_logits", "end_logits"):
            if name in result:
                # With several processes, a global array that no process holds whole.
                outputs.setdefault(name, []).append(to_host(result[name])[real])
        if predict_with_generate and task == "seq2seq":
            if sharded_generate is not None:
                output = sharded_generate(params, batch["input_ids"], batch["attention_mask"])
                sequences, lengths = to_host((output.sequences, output.lengths))
                generated = sequences[:, :int(lengths.max())]
            else:
                generated = generate(model.module, params, batch["input_ids"], batch["attention_mask"],
                                     model.generation_config, **(generation_options or {}))
            generated = np.asarray(generated)[real]
            texts = model.tokenizer.batch_decode(generated, skip_special_tokens=True)
            predictions.extend(text.strip() for text in texts)
            generated_lengths.extend(np.count_nonzero(generated != pad_token_id, axis=1).tolist())
    results = {"loss": loss_sum / max(weight, 1.0)}
    if task == "classify":
        results.update(metrics.classification_metrics(np.concatenate(outputs["logits"]), np.stack(data.references),
                                                      model.config.problem_type))
    elif task == "qa":
        answers = qa.extract_answers(np.concatenate(outputs["start_logits"]), np.concatenate(outputs["end_logits"]),
                                     data.references, max_answer_length, allow_no_answer, null_score_threshold)
        results.update(metrics.squad_metrics(answers, [reference.answers for reference in data.references]))
    elif predictions:
        results.update(metrics.rouge(predictions, data.references))
        # Generated tokens other than padding (decoder start and end tokens included), as transformers reports it.
        results["gen_len"] = float(np.mean(generated_lengths))
    return {f"eval_{name}": value for name, value in results.items()}
