"""Checks of user input at the boundary, outside `jit`, with errors that name the problem.

Inside `jit` the model trusts its inputs (no data-dependent branches); these functions run
on concrete arrays before the call.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from bart_jax.config import BartConfig
from bart_jax.model.losses import IGNORE_INDEX
from bart_jax.model.registry import head_spec

ID_ARGUMENTS = ("input_ids", "decoder_input_ids")
MASK_ARGUMENTS = {"attention_mask": "input_ids", "decoder_attention_mask": "decoder_input_ids"}


def _as_numpy(value: Any, name: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except Exception as error:  # noqa: BLE001 - any conversion failure is a bad argument
        raise ValueError(f"{name} cannot be read as an array: {error}") from None


def check_token_ids(ids: Any, config: BartConfig, name: str = "input_ids",
                    allow_ignore_index: bool = False) -> np.ndarray:
    """ids [batch, length] integers in [0, vocab_size), at least one row and one token, and no
    longer than max_position_embeddings."""
    ids = _as_numpy(ids, name)
    if ids.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, length], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {ids.dtype}")
    # Zero rows or zero tokens would reach attention as empty reductions and divisions by zero.
    if ids.shape[0] == 0:
        raise ValueError(f"{name} has no rows (shape {ids.shape}); give at least one example")
    if ids.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {ids.shape}); give at least one token per row")
    if ids.shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"{name} has length {ids.shape[1]}, longer than the model's max_position_embeddings "
            f"({config.max_position_embeddings}); truncate the input"
        )
    valid = (ids >= 0) & (ids < config.vocab_size)
    if allow_ignore_index:
        valid |= ids == IGNORE_INDEX
    if not valid.all():
        bad = ids[~valid]
        raise ValueError(
            f"{name} holds ids outside the vocabulary [0, {config.vocab_size}): "
            f"{sorted(set(bad.tolist()))[:10]}"
        )
    return ids


def check_classification_labels(labels: Any, config: BartConfig, batch: int | None = None) -> np.ndarray:
    """labels of sequence classification, as the loss reads them for `config.problem_type` (unset:
    regression for one label, class ids for integer labels, multi-hot targets otherwise):
    class ids [batch] in [0, num_labels) (or IGNORE_INDEX), or float targets [batch(, num_labels)].

    Out-of-range ids would index past the logits: a NaN loss above, a finite wrong one below 0.
    """
    labels = _as_numpy(labels, "labels")
    num_labels = config.num_labels
    if labels.dtype == np.bool_ or not (np.issubdtype(labels.dtype, np.integer)
                                        or np.issubdtype(labels.dtype, np.floating)):
        raise ValueError(f"labels must be class ids or float targets, got dtype {labels.dtype}")
    if batch is not None and (labels.ndim == 0 or labels.shape[0] != batch):
        raise ValueError(f"labels has shape {labels.shape} but input_ids has {batch} rows")
    problem_type = config.problem_type
    if problem_type is None:  # transformers' rule, as losses.classification_problem_type
        if num_labels == 1:
            problem_type = "regression"
        elif np.issubdtype(labels.dtype, np.integer):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "single_label_classification":
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels of single-label classification must be integer class ids, got dtype "
                             f"{labels.dtype}")
        valid = ((labels >= 0) & (labels < num_labels)) | (labels == IGNORE_INDEX)
        if not valid.all():
            raise ValueError(f"labels holds class ids outside [0, {num_labels}) (num_labels is {num_labels}): "
                             f"{sorted(set(labels[~valid].tolist()))[:10]}")
    elif problem_type == "multi_label_classification" and labels.shape[1:] != (num_labels,):
        raise ValueError(f"labels of multi-label classification must have shape [batch, num_labels] = "
                         f"[batch, {num_labels}], got {labels.shape}")
    return labels


def check_mask(mask: Any, shape: tuple[int, ...], name: str, against: str) -> np.ndarray:
    mask = _as_numpy(mask, name)
    if mask.shape != tuple(shape):
        raise ValueError(f"{name} has shape {mask.shape} but {against} has shape {tuple(shape)}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1")
    return mask


def check_head_mask(mask: Any, layers: int, heads: int, name: str) -> np.ndarray:
    mask = _as_numpy(mask, name)
    if mask.shape != (layers, heads):
        raise ValueError(f"{name} must have shape [layers, heads] = ({layers}, {heads}), got {mask.shape}")
    return mask


def check_classification_eos(input_ids: np.ndarray, eos_token_id: int) -> None:
    """Sequence classification pools at the last EOS: every row needs one, and (as transformers
    requires) all rows the same number of them."""
    counts = (input_ids == eos_token_id).sum(axis=1)
    if (counts == 0).any():
        rows = np.nonzero(counts == 0)[0].tolist()
        raise ValueError(f"each example must contain an EOS token (id {eos_token_id}); rows {rows} have none")
    if len(set(counts.tolist())) != 1:
        raise ValueError(f"all examples must have the same number of EOS tokens, got counts {counts.tolist()}")


def check_inputs(config: BartConfig, head: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Validates the keyword arguments of a head call; returns them with arrays as numpy."""
    spec = head_spec(head)
    checked: dict[str, Any] = dict(inputs)
    for name in ID_ARGUMENTS:
        if checked.get(name) is not None:
            checked[name] = check_token_ids(checked[name], config, name)
    for mask_name, ids_name in MASK_ARGUMENTS.items():
        if checked.get(mask_name) is not None:
            reference = checked.get(ids_name)
            if reference is None:
                embeds = checked.get("inputs_embeds" if ids_name == "input_ids" else "decoder_inputs_embeds")
                if embeds is None:
                    continue
                shape = np.shape(embeds)[:2]
            else:
                shape = reference.shape
            checked[mask_name] = check_mask(checked[mask_name], shape, mask_name, ids_name)
    if checked.get("labels") is not None and spec.token_labels:
        checked["labels"] = check_token_ids(checked["labels"], config, "labels", allow_ignore_index=True)
    elif checked.get("labels") is not None and spec.pools_at_eos:  # the pooling head is the classifier
        rows = checked["input_ids"].shape[0] if checked.get("input_ids") is not None else None
        checked["labels"] = check_classification_labels(checked["labels"], config, rows)
    decoder_layers_heads = (config.decoder_layers, config.decoder_attention_heads)
    for name, (layers, heads) in {
        "head_mask": (config.encoder_layers, config.encoder_attention_heads),
        "decoder_head_mask": decoder_layers_heads,
        "cross_attn_head_mask": decoder_layers_heads,
    }.items():
        if checked.get(name) is not None:
            if name == "head_mask" and not spec.has_encoder:  # a decoder-only head masks its decoder
                layers, heads = decoder_layers_heads
            checked[name] = check_head_mask(checked[name], layers, heads, name)
    if spec.pools_at_eos:
        if checked.get("input_ids") is None:
            raise ValueError(f"{head} needs input_ids (it pools at the last EOS token)")
        check_classification_eos(checked["input_ids"], config.eos_token_id)
    return checked

