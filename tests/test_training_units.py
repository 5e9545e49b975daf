"""The parts of bart_jax.training: data reading, features, batching, optimizer, objectives,
train step, metrics, options and run directories. Fast, tiny models only."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bart_jax import modeling
from bart_jax.config import BartConfig
from bart_jax.conversion import hf_to_flax
from bart_jax.tokenizer import BartTokenizer
from bart_jax.training import batching, checkpointing, data, features, metrics, objectives, qa
from bart_jax.training.arguments import RESUMABLE_CHANGES, TrainingArguments, parse_arguments
from bart_jax.training.optimizer import learning_rate_schedule, make_optimizer, trainable_mask
from bart_jax.training.train_step import create_train_state, make_train_step
from hf_reference import SHARED_DATA, TOKENIZER_DIR, hf_model, random_batch

SQUAD_FILE = SHARED_DATA / "qa" / "squad_hf_fixture_sample.json"
REPOSITORY = SHARED_DATA.parent.parent / "main"


@functools.lru_cache(maxsize=None)
def tokenizer() -> BartTokenizer:
    return BartTokenizer.from_pretrained(TOKENIZER_DIR)


# --- reading data ------------------------------------------------------------------------------
def test_reads_every_file_format(tmp_path):
    rows = [{"document": "a b", "summary": "a", "meta": {"lang": "en"}}, {"document": "c", "summary": "d",
                                                                         "meta": {"lang": "fr"}}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    (tmp_path / "x.json").write_text(json.dumps({"version": 1, "data": rows}))
    (tmp_path / "x.csv").write_text('document,summary\n"a b",a\nc,d\n')
    (tmp_path / "x.tsv").write_text('document\tsummary\n"a b\ta\nc\td\n')
    for name in ("x.jsonl", "x.json"):
        records = data.read_records(tmp_path / name)
        assert data.column_values(records, "meta.lang") == ["en", "fr"], f"{name}: nested column"
    assert data.column_values(data.read_records(tmp_path / "x.csv"), "document") == ["a b", "c"]
    # TSV is read unquoted, as GLUE files need.
    assert data.column_values(data.read_records(tmp_path / "x.tsv"), "document") == ['"a b', "c"]
    squad = data.read_records(SQUAD_FILE)
    assert len(squad) == 14 and "answers" in squad[0]


def test_bad_data_files_are_reported(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{"a": \n')
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="holds no examples"):
        data.read_records(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        data.read_records(tmp_path / "broken.jsonl")
    with pytest.raises(ValueError, match="expected one of"):
        data.read_records(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="not found"):
        data.read_records(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"no column 'summary'; its columns are \['document'\]"):
        data.column_values([{"document": "x"}], "summary", "train.jsonl")


# --- features ----------------------------------------------------------------------------------
def test_seq2seq_features_drop_empty_and_truncate_long_examples():
    long_text = "word " * 100
    records = [{"document": "A short text.", "summary": "Short."}, {"document": "  ", "summary": "x"},
               {"document": long_text, "summary": None}, {"document": long_text, "summary": "Fine."}]
    task_data = features.seq2seq_data(records, tokenizer(), "document", "summary", 16, 8, "train")
    assert (task_data.stats.records, task_data.stats.empty, task_data.stats.truncated) == (4, 2, 1)
    expected = tokenizer()(["A short text.", long_text], truncation=True, max_length=16)["input_ids"]
    assert [ids.tolist() for ids in task_data.columns["input_ids"]] == expected
    assert task_data.columns["labels"][0].tolist() == tokenizer()("Short.")["input_ids"]
    assert task_data.references == ["Short.", "Fine."]


def test_denoising_splits_long_documents_into_blocks():
    text = " ".join(f"Sentence number {i}." for i in range(40))
    task_data = features.denoising_data([{"text": text}, {"text": ""}], tokenizer(), "text", 32,
                                        features.noise.NoiseConfig(), seed=0, source="train")
    ids = tokenizer()(text)["input_ids"]
    blocks = task_data.columns["labels"]
    assert task_data.stats.empty == 1 and task_data.stats.truncated == 1
    assert all(len(block) <= 32 and block[0] == 0 and block[-1] == 2 for block in blocks)
    assert np.concatenate([block[1:-1] for block in blocks]).tolist() == ids[1:-1], "blocks must cover the document"
    noisy = task_data.make_inputs(0, 0)
    np.testing.assert_array_equal(noisy, task_data.make_inputs(0, 0))
    assert len(noisy) <= 32 and noisy[0] == 0 and noisy[-1] == 2


def test_label_schemes():
    names = features.infer_label_scheme(["b", "a", "b"], None, None)
    assert names == features.LabelScheme("single_label_classification", ("a", "b"))
    mnli = features.infer_label_scheme(["entailment"], None, None, ("contradiction", "neutral", "entailment"))
    assert mnli.names == ("contradiction", "neutral", "entailment"), "a checkpoint's label order is kept"
    assert features.infer_label_scheme(["3.8", "1.0"], None, None).problem_type == "regression"
    assert features.infer_label_scheme([0, 2], None, None).num_labels == 3
    multi = features.infer_label_scheme([["x", "y"], ["y"]], None, None)
    assert multi.problem_type == "multi_label_classification"
    np.testing.assert_array_equal(features.encode_labels([["x", "y"], ["y"]], multi, "train"), [[1, 1], [0, 1]])
    with pytest.raises(ValueError, match="unknown label 'c'"):
        features.encode_labels(["c"], names, "validation")
    with pytest.raises(ValueError, match="num_labels is 3"):
        features.infer_label_scheme(["a", "b"], None, 3)


def test_classification_features_of_text_pairs():
    records = data.read_records(SHARED_DATA / "classification" / "mrpc_hf_fixture" / "dev.csv")
    scheme = features.infer_label_scheme(data.column_values(records, "label"), None, None)
    task_data = features.classification_data(records, tokenizer(), "sentence1", "sentence2", "label", 24, scheme,
                                             "dev.csv")
    first, second = data.column_values(records, "sentence1"), data.column_values(records, "sentence2")
    expected = tokenizer()(first, second, truncation=True, max_length=24)["input_ids"]
    assert [ids.tolist() for ids in task_data.columns["input_ids"]] == expected
    assert task_data.stats.truncated == sum(
        len(ids) > 24 for ids in tokenizer()(first, second)["input_ids"])
    assert scheme.names == ("equivalent", "not_equivalent")
    assert [int(label) for label in task_data.columns["labels"]] == [
        scheme.names.index(name) for name in data.column_values(records, "label")]


def test_qa_positions_point_at_the_answer_text():
    records = data.read_records(SQUAD_FILE)
    task_data = qa.qa_data(records, tokenizer(), "question", "context", "answers", 384, "train")
    answerable = 0
    for record, start, end, reference in zip(records, task_data.columns["start_positions"],
                                             task_data.columns["end_positions"], task_data.references):
        if not record["answers"]["text"]:
            assert start == end == qa.NO_ANSWER_POSITION
            continue
        answerable += 1
        span = reference.context[reference.offsets[start, 0]:reference.offsets[end, 1]]
        assert span == record["answers"]["text"][0], f"positions {start}-{end} give {span!r}"
        # Logits that pick the gold span give back the gold answer.
        start_logits, end_logits = np.full(384, -10.0), np.full(384, -10.0)
        start_logits[start] = end_logits[end] = 10.0
        assert qa.extract_answer(start_logits, end_logits, reference, 30, True) == span
    assert answerable == 8


def test_qa_answer_cut_off_by_truncation_points_at_position_zero():
    context = "filler " * 60 + "The answer is Paris."
    record = {"question": "Where?", "context": context,
              "answers": {"text": ["Paris"], "answer_start": [context.index("Paris")]}}
    task_data = qa.qa_data([record], tokenizer(), "question", "context", "answers", 32, "train")
    assert task_data.stats.truncated == 1
    assert task_data.columns["start_positions"][0] == task_data.columns["end_positions"][0] == 0
    # Logits favouring position 0 mean "no answer" in SQuAD 2.0 mode, and are ignored otherwise.
    start_logits, end_logits = np.zeros(32), np.zeros(32)
    start_logits[0] = end_logits[0] = 5.0
    reference = task_data.references[0]
    assert qa.extract_answer(start_logits, end_logits, reference, 30, allow_no_answer=True) == ""
    assert qa.extract_answer(start_logits, end_logits, reference, 30, allow_no_answer=False) != ""


# --- batching ----------------------------------------------------------------------------------
def test_batch_order_is_resumable():
    uninterrupted = batching.training_batches(10, 3, seed=7, start=batching.DataPosition())
    first = [next(uninterrupted) for _ in range(7)]
    resumed = batching.training_batches(10, 3, seed=7, start=first[3][0])
    for expected, again in zip(first[4:], (next(resumed) for _ in range(3))):
        assert expected[0] == again[0] and expected[1] == again[1]
        np.testing.assert_array_equal(expected[2], again[2])
    epoch_zero = np.concatenate([indices for _, epoch, indices in first if epoch == 0])
    assert len(epoch_zero) == 9 and len(set(epoch_zero.tolist())) == 9, "an epoch repeats no example"
    assert first[2][0] == batching.DataPosition(0, 3) and first[3][1] == 1
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(batching.training_batches(2, 3, 0, batching.DataPosition()))


def test_collate_pads_to_static_shapes():
    task_data = features.TaskData({"input_ids": [np.array([0, 5, 2]), np.array([0, 2])],
                                   "labels": [np.array([0, 7, 2]), np.array([0, 2])]},
                                  {"input_ids": 4, "labels": 5}, features.DataStats(2))
    batch = batching.collate(task_data, np.array([1, -1]), epoch=0, pad_token_id=1)
    np.testing.assert_array_equal(batch["input_ids"], [[0, 2, 1, 1], [0, 5, 2, 1]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(batch["labels"], [[0, 2, -100, -100, -100], [0, 7, 2, -100, -100]])
    np.testing.assert_array_equal(batch["example_mask"], [1.0, 0.0])
    assert list(batching.evaluation_batches(5, 2))[-1].tolist() == [4, -1]


# --- optimizer ---------------------------------------------------------------------------------
def test_weight_decay_skips_biases_and_layer_norms_and_final_logits_bias_is_frozen():
    params = {"final_logits_bias": jnp.ones((1, 4)),
              "dense": {"weight": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "layer_norm": {"scale": jnp.ones(2)}}
    optimizer = make_optimizer(params, optax.constant_schedule(0.1), weight_decay=0.5)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_allclose(updates["dense"]["weight"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    for name, update in (("bias", updates["dense"]["bias"]), ("scale", updates["layer_norm"]["scale"])):
        np.testing.assert_array_equal(update, 0.0, err_msg=f"{name} must not be decayed")
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_array_equal(updates["final_logits_bias"], 0.0, err_msg="final_logits_bias must stay frozen")


def test_learning_rate_schedules():
    linear = learning_rate_schedule(1.0, 10, 2, "linear")
    assert [float(linear(step)) for step in (0, 1, 2, 6, 10)] == pytest.approx([0, 0.5, 1, 0.5, 0])
    cosine = learning_rate_schedule(1.0, 10, 2, "cosine")
    assert float(cosine(6)) == pytest.approx(0.5) and float(cosine(10)) == pytest.approx(0, abs=1e-7)
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        learning_rate_schedule(1.0, 10, 0, "polynomial")


# --- objectives and the train step -------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _module_and_params(head: str, **changes):
    """A bart_jax module and the params of a perturbed transformers model (non-zero biases, so a
    wrongly ignored one would show); converting avoids compiling a Flax init."""
    reference = hf_model(head, seed=0, encoder_layers=1, decoder_layers=1, **changes)
    config = BartConfig.from_dict(reference.config.to_dict())
    state = {key: value.detach().numpy() for key, value in reference.state_dict().items()}
    return modeling.head_class(head)(config), jax.tree.map(jnp.asarray, hf_to_flax(state, config, head))


def _evaluate(module, task, batch, params, label_smoothing=0.0):
    """(loss sum, weight, predictions) of the jitted objective."""
    return jax.jit(objectives.make_objective(module, task, label_smoothing))(params, batch, None)


def _model_outputs(module, params, *args, **kwargs):
    return jax.jit(lambda p, a, k: module.apply({"params": p}, *a, **k))(params, args, kwargs)


def _seq2seq_batch(vocab_size: int, batch: int = 4):
    input_ids, attention_mask = random_batch(vocab_size, batch=batch, length=9, seed=1)
    labels, label_mask = random_batch(vocab_size, batch=batch, length=7, seed=2)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": np.where(label_mask == 1, labels, -100), "example_mask": np.ones(batch, np.float32)}


def test_generative_objective_equals_the_model_loss_and_smoothing_formula():
    module, params = _module_and_params("BartForConditionalGeneration")
    batch = _seq2seq_batch(module.config.vocab_size)
    loss_sum, weight, _ = _evaluate(module, "seq2seq", batch, params)
    outputs = _model_outputs(module, params, batch["input_ids"], batch["attention_mask"],
                             labels=jnp.asarray(batch["labels"]))
    np.testing.assert_allclose(loss_sum / weight, outputs.loss, rtol=1e-6)
    assert weight == np.sum(batch["labels"] != -100)

    smoothed_sum, _, _ = _evaluate(module, "seq2seq", batch, params, label_smoothing=0.1)
    logits = outputs.logits
    valid = batch["labels"] != -100
    targets = optax.smooth_labels(jax.nn.one_hot(np.where(valid, batch["labels"], 0), logits.shape[-1]), 0.1)
    expected = np.sum(np.where(valid, optax.softmax_cross_entropy(logits, targets), 0.0))
    np.testing.assert_allclose(smoothed_sum, expected, rtol=1e-5)


@pytest.mark.parametrize("problem_type", ["single_label_classification", "multi_label_classification", "regression"])
def test_classification_objective_equals_the_model_loss(problem_type):
    num_labels = 1 if problem_type == "regression" else 3
    module, params = _module_and_params("BartForSequenceClassification", num_labels=num_labels,
                                        problem_type=problem_type)
    input_ids, attention_mask = random_batch(module.config.vocab_size, batch=4, length=9)
    rng = np.random.default_rng(0)
    labels = {"single_label_classification": rng.integers(0, 3, 4).astype(np.int32),
              "multi_label_classification": rng.integers(0, 2, (4, 3)).astype(np.float32),
              "regression": rng.normal(size=4).astype(np.float32)}[problem_type]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "example_mask": np.ones(4, np.float32)}
    loss_sum, weight, predictions = _evaluate(module, "classify", batch, params)
    outputs = _model_outputs(module, params, input_ids, attention_mask, labels=jnp.asarray(labels))
    np.testing.assert_allclose(loss_sum / weight, outputs.loss, rtol=1e-5)
    np.testing.assert_allclose(predictions["logits"], outputs.logits, rtol=1e-6)


def test_span_objective_equals_the_model_loss_and_ignores_padding_rows():
    module, params = _module_and_params("BartForQuestionAnswering")
    input_ids, attention_mask = random_batch(module.config.vocab_size, batch=4, length=9)
    starts, ends = np.array([1, 2, 0, 3]), np.array([2, 4, 0, 3])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "start_positions": starts,
             "end_positions": ends, "example_mask": np.array([1, 1, 1, 0], np.float32)}
    loss_sum, weight, _ = _evaluate(module, "qa", batch, params)
    reference = _model_outputs(module, params, input_ids[:3], attention_mask[:3],
                               start_positions=jnp.asarray(starts[:3]), end_positions=jnp.asarray(ends[:3])).loss
    assert weight == 3
    np.testing.assert_allclose(loss_sum / weight, reference, rtol=1e-5)


def test_gradient_accumulation_is_one_larger_batch():
    module, params = _module_and_params("BartForConditionalGeneration", dropout=0.0)
    schedule = optax.constant_schedule(1.0)
    # Plain SGD: the new params differ from the old by exactly the gradient (Adam would amplify
    # float rounding in near-zero gradients).
    optimizer = optax.sgd(schedule)
    step = jax.jit(make_train_step(objectives.make_objective(module, "seq2seq"), optimizer, trainable_mask(params),
                                   schedule))
    batch = _seq2seq_batch(module.config.vocab_size)
    whole = {name: value[None] for name, value in batch.items()}
    halves = {name: value.reshape(2, 2, *value.shape[1:]) for name, value in batch.items()}
    key = jax.random.PRNGKey(0)
    one, metrics_one = step(create_train_state(params, optimizer), whole, key)
    two, metrics_two = step(create_train_state(params, optimizer), halves, key)
    np.testing.assert_allclose(metrics_one["loss"], metrics_two["loss"], rtol=1e-6)
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(one.params), jax.tree.leaves(one.params),
                          jax.tree.leaves(two.params)):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=jax.tree_util.keystr(path[0]))
    assert int(one.step) == int(two.step) == 1
    np.testing.assert_array_equal(one.params["final_logits_bias"], params["final_logits_bias"],
                                  err_msg="the frozen final_logits_bias got a gradient")


# --- metrics -----------------------------------------------------------------------------------
def test_metrics():
    assert metrics.rouge(["the cat sat"], ["the cat sat"]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0})
    labels = np.array([0, 1, 1, 2])
    logits = np.eye(3)[[0, 1, 2, 2]]
    result = metrics.classification_metrics(logits, labels, "single_label_classification")
    per_label_f1 = [1.0, 2 * 1 / (2 * 1 + 0 + 1), 2 * 1 / (2 * 1 + 1 + 0)]  # 2TP / (2TP + FP + FN)
    assert result == pytest.approx({"accuracy": 0.75, "f1": np.mean(per_label_f1)})
    assert metrics.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert metrics.squad_metrics(["Paris", "in London", ""], [["Paris"], ["London"], []]) == pytest.approx(
        {"exact_match": 2 / 3, "f1": (1 + 2 * 0.5 * 1 / 1.5 + 1) / 3})


# --- options and run directories ---------------------------------------------------------------
def test_recipe_then_command_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("task: classify\nlearning_rate: 3e-5\nmax_seq_length: 64\npredict_with_generate: true\n")
    arguments = parse_arguments(["--config", str(recipe), "--output_dir", "out", "--train_file", "t.csv",
                                 "--config_name", "c", "--max_seq_length", "32"])
    assert (arguments.task, arguments.learning_rate, arguments.max_seq_length) == ("classify", 3e-5, 32)
    assert arguments.predict_with_generate is True
    recipe.write_text("learning_rte: 1.0\n")
    with pytest.raises(ValueError, match=r"unknown options \['learning_rte'\]"):
        parse_arguments(["--config", str(recipe), "--output_dir", "o", "--train_file", "t", "--config_name", "c"])
    with pytest.raises(ValueError, match="exactly one of"):
        parse_arguments(["--output_dir", "o", "--train_file", "t"])
    with pytest.raises(ValueError, match="task must be one of"):
        TrainingArguments(output_dir="o", task="translate")
    with pytest.raises(ValueError, match="remat_policy must be one of none, full"):
        TrainingArguments(output_dir="o", remat_policy="sometimes")


def test_shipped_recipes_are_valid():
    recipes = sorted((REPOSITORY / "configs" / "train").glob("*.yaml"))
    assert len(recipes) >= 4, "expected recipes for pre-training, CNN/DM, XSum and MNLI"
    for recipe in recipes:
        model = [] if "config_name" in recipe.read_text() else ["--model_name_or_path", "a-model"]
        arguments = parse_arguments(["--config", str(recipe), "--output_dir", "o", "--train_file", "t.jsonl", *model])
        assert arguments.task in objectives.TASK_HEADS, recipe.name


def test_output_dir_of_another_run_is_refused(tmp_path):
    first = TrainingArguments(output_dir=str(tmp_path), train_file="a.jsonl", config_name="c").run_identity()
    checkpointing.prepare_output_dir(str(tmp_path), first, False, RESUMABLE_CHANGES)
    (tmp_path / checkpointing.CHECKPOINT_DIR / "4").mkdir(parents=True)
    same_run = dict(first)
    checkpointing.prepare_output_dir(str(tmp_path), same_run, False, RESUMABLE_CHANGES)
    other = dict(first, learning_rate=1.0)
    with pytest.raises(ValueError, match=r"different run \(learning_rate: 5e-05 -> 1.0\)"):
        checkpointing.prepare_output_dir(str(tmp_path), other, False, RESUMABLE_CHANGES)
    checkpointing.prepare_output_dir(str(tmp_path), other, True, RESUMABLE_CHANGES)
    assert not (tmp_path / checkpointing.CHECKPOINT_DIR).exists(), "overwrite must remove the old checkpoints"
    assert math.isclose(json.loads((tmp_path / checkpointing.RUN_CONFIG_FILE).read_text())["learning_rate"], 1.0)
