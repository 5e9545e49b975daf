"""Training recipes: YAML files of option values (see configs/train/), keyed by option name."""

from __future__ import annotations

import os
from typing import Any, Collection

import yaml


def load_recipe(path: str | os.PathLike, known_options: Collection[str]) -> dict[str, Any]:
    """The options of a YAML recipe; unknown names are an error (a typo would silently do nothing)."""
    if not os.path.isfile(path):
        raise ValueError(f"recipe not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            recipe = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values")
    unknown = sorted(set(recipe) - set(known_options))
    if unknown:
        raise ValueError(f"{path} sets unknown options {unknown}")
    return recipe
