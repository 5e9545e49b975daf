"""bart_jax.training.recipes: the recipes shipped in configs/train/ load into valid options."""

from __future__ import annotations

import pathlib

from bart_jax.training import objectives
from bart_jax.training.arguments import parse_arguments

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


def test_shipped_recipes_are_valid():
    recipes = sorted((REPOSITORY / "configs" / "train").glob("*.yaml"))
    assert len(recipes) >= 4, "expected recipes for pre-training, CNN/DM, XSum and MNLI"
    for recipe in recipes:
        model = [] if "config_name" in recipe.read_text() else ["--model_name_or_path", "a-model"]
        arguments = parse_arguments(["--config", str(recipe), "--output_dir", "o", "--train_file", "t.jsonl",
                                     "--validation_file", "v.jsonl", *model])
        assert arguments.task in objectives.TASK_HEADS, recipe.name


def test_mnli_recipe_is_barts_glue_recipe():
    # fairseq examples/bart/README.glue.md, MNLI: 3 classes, lr 5e-6, batch 128, 30968 updates, 1858 warmup.
    arguments = parse_arguments(["--config", str(REPOSITORY / "configs" / "train" / "mnli.yaml"), "--output_dir", "o",
                                 "--train_file", "t.jsonl", "--validation_file", "v.jsonl",
                                 "--model_name_or_path", "a-model"])
    batch = arguments.per_device_train_batch_size * arguments.gradient_accumulation_steps
    assert (arguments.num_labels, arguments.learning_rate, batch, arguments.max_steps, arguments.warmup_steps) == (
        3, 5e-6, 128, 30968, 1858)
    assert (arguments.adam_beta1, arguments.adam_beta2, arguments.adam_epsilon, arguments.weight_decay,
            arguments.max_grad_norm, arguments.lr_scheduler_type) == (0.9, 0.98, 1e-8, 0.01, 0.0, "linear")
    assert (arguments.best_model_metric(), arguments.best_is_greater()) == ("eval_accuracy", True)
