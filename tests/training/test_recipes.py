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
        arguments = parse_arguments(["--config", str(recipe), "--output_dir", "o", "--train_file", "t.jsonl", *model])
        assert arguments.task in objectives.TASK_HEADS, recipe.name
