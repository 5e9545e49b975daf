"""bart_jax.training.arguments: a recipe's values, then the command line's; bad options are refused."""

from __future__ import annotations

import pytest

from bart_jax.training.arguments import TrainingArguments, parse_arguments


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
