"""Model directories from a local path or the Hugging Face hub."""

from __future__ import annotations

import fnmatch
import os

import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError, HFValidationError

from bart_jax.checkpoints.files import GENERATION_CONFIG_NAME, TOKENIZER_FILES
from bart_jax.config import CONFIG_NAME

SAFETENSORS_PATTERNS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
TORCH_BIN_PATTERNS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")
METADATA_FILES = (CONFIG_NAME, GENERATION_CONFIG_NAME, *TOKENIZER_FILES)

try:  # the HTTP client of huggingface_hub >= 1.0; its errors are not OSErrors
    import httpx

    _NETWORK_ERRORS: tuple[type[BaseException], ...] = (HfHubHTTPError, OSError, httpx.HTTPError)
except ImportError:
    _NETWORK_ERRORS = (HfHubHTTPError, OSError)


class HubUnavailableError(ValueError):
    """The hub could not be reached, or does not have the requested model."""


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "namespace/name"; anything else can only be meant as a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name)


def _has_safetensors(directory: str) -> bool:
    return any(
        fnmatch.fnmatch(name, pattern) for name in os.listdir(directory) for pattern in SAFETENSORS_PATTERNS
    )


def resolve_model_directory(
    path_or_hub_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> str:
    """A local directory holding `path_or_hub_id`'s config, weights and tokenizer files.

    A local directory is returned as is. Otherwise `path_or_hub_id` is a hub id, and only the
    files bart_jax needs are fetched (safetensors weights when the repository has them,
    otherwise `pytorch_model.bin`), or taken from the cache when `HF_HUB_OFFLINE=1`.
    Raises HubUnavailableError (a ValueError) when the hub cannot be reached or lacks the model.
    """
    name = os.fspath(path_or_hub_id)
    if os.path.isdir(name):
        return name
    if _looks_like_path(name):
        raise ValueError(f"{name} is not a directory")
    download = dict(revision=revision, cache_dir=cache_dir, token=token, endpoint=endpoint)
    try:
        directory = huggingface_hub.snapshot_download(
            name, allow_patterns=[*METADATA_FILES, *SAFETENSORS_PATTERNS], **download
        )
        if not _has_safetensors(directory):
            directory = huggingface_hub.snapshot_download(
                name, allow_patterns=[*METADATA_FILES, *TORCH_BIN_PATTERNS], **download
            )
    except HFValidationError:
        raise ValueError(f"{name!r} is neither a local directory nor a valid hub model id") from None
    except _NETWORK_ERRORS as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise HubUnavailableError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(error).__name__}: {reason}); download the model elsewhere and pass the local "
            f"directory that holds {CONFIG_NAME} and the weights instead"
        ) from None
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise ValueError(f"hub repository {name!r} has no {CONFIG_NAME}")
    return directory
