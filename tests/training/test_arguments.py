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


@pytest.mark.parametrize("argv, message", [
    ([], "pass exactly one of --train_file and --dataset_name"),
    (["--train_file", "t.jsonl", "--dataset_name", "xsum"], "pass exactly one of --train_file and --dataset_name"),
    (["--dataset_name", "xsum", "--validation_split", "validation", "--validation_file", "v.jsonl"],
     "pass --validation_file or --validation_split"),
    (["--train_file", "t.jsonl", "--validation_split", "validation"], "--validation_split names a split of"),
    (["--train_file", "t.jsonl", "--task", "denoise"], "an epoch's number of updates is unknown in advance: pass "
                                                      "--max_steps"),
    (["--train_file", "t.jsonl", "--coordinator_address", "10.0.0.1:1234"], None),
])
def test_data_and_process_options_are_checked(argv, message, tmp_path):
    argv = ["--output_dir", str(tmp_path / "o"), "--config_name", "c", *argv]
    if message is None:  # checked when the processes are joined (bart_jax.parallel.distributed)
        assert parse_arguments(argv).coordinator_address == "10.0.0.1:1234"
        return
    with pytest.raises(ValueError, match=message):
        parse_arguments(argv)


def test_a_coordinator_needs_the_process_count_and_id():
    from bart_jax.parallel import distributed

    with pytest.raises(ValueError, match="--coordinator_address needs --num_processes and --process_id"):
        distributed.initialize_if_needed("10.0.0.1:1234", None, None)
    with pytest.raises(ValueError, match=r"process_id must be in 0 \.\. 1, got 2"):
        distributed.initialize_if_needed("10.0.0.1:1234", 2, 2)
    assert distributed.initialize_if_needed() is False, "a lone process is left alone"
