"""Where a model comes from: a local folder, or a Hugging Face hub repo id read through the hub cache.

The rule is transformers': an existing path is local; anything else must be a valid repo id
(``huggingface_hub`` validates it: ``Qwen/Qwen2.5-7B``, ``meta-llama/Llama-3.1-8B``, ``gpt2``), which
``snapshot_download`` fetches or, offline (``HF_HUB_OFFLINE=1``), finds in the cache (``HF_HOME`` /
``HF_HUB_CACHE``). Every failure names its cause and the fix: not cached while offline, no such
repository or revision, a gated repository, a folder without ``config.json``, pickled weights only.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llmq.errors import CheckpointError

log = logging.getLogger(__name__)

# What a model needs: config, safetensors shards and their index, tokenizer files, generation config.
FILE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def check_model_folder(folder: Path, name: str | None = None, weights: bool = True) -> Path:
    """``folder`` if it holds a transformers model (``config.json``, and safetensors weights with ``weights``)."""
    name = name or str(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{name} is a file, not a model folder: point at the folder that holds config.json")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{name} has no config.json: point at a transformers model folder "
                              "(the one save_pretrained wrote)")
    if weights and not any(folder.glob("*.safetensors")) and any(p.suffix in PICKLED_SUFFIXES
                                                                  for p in folder.iterdir()):
        raise CheckpointError(
            f"{name} holds pickled weights (*.bin) only, which llmq does not read: convert them once with "
            "transformers (AutoModelForCausalLM.from_pretrained(path).save_pretrained(new_path)) to get "
            "safetensors shards")
    return folder  # a folder with no weights at all is refused when its shards are listed


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _pickled_only_on_hub(repo_id: str, revision: str | None) -> bool:
    """Whether the repository lists pickled weights and no safetensors (asked only when online)."""
    from huggingface_hub import list_repo_files

    try:
        files = list_repo_files(repo_id, revision=revision)
    except Exception:  # noqa: BLE001 (a failed listing just leaves the plainer message)
        return False
    return not any(f.endswith(".safetensors") for f in files) and any(f.endswith(PICKLED_SUFFIXES) for f in files)


def resolve_model(name_or_path: str | Path, revision: str | None = None, weights: bool = True,
                  trust_remote_code: bool = False) -> Path:
    """The local folder holding ``name_or_path``: the folder itself, or the hub snapshot of that repo id.

    ``revision`` (branch, tag or commit) applies to hub ids. ``weights=False`` skips the check for
    safetensors shards (enough for reading a config). With ``trust_remote_code`` the repository's
    ``*.py`` files are fetched too.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if revision is not None:
            log.warning("revision %s ignored: %s is a local folder", revision, name)
        return check_model_folder(path, name, weights)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise CheckpointError(
            f"model path {name} does not exist, and it is not a Hugging Face hub id either: give a local "
            "transformers model folder or a hub id such as Qwen/Qwen2.5-7B") from None
    at = f" at revision {revision}" if revision else ""
    patterns = FILE_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        # offline, the cache is looked up without any request (as transformers does)
        folder = Path(snapshot_download(name, revision=revision, allow_patterns=patterns,
                                        local_files_only=is_offline()))
    except GatedRepoError:
        raise CheckpointError(
            f"{name} is a gated repository: accept its license on https://huggingface.co/{name} and log in "
            "(`hf auth login`, or set HF_TOKEN) with that account") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{name} has no revision {revision!r}: give an existing branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"no repository {name} on the Hugging Face hub (or it is private: log in with `hf auth login`); "
            "check the spelling, or give a local folder") from None
    except LocalEntryNotFoundError as e:
        from huggingface_hub import constants

        if is_offline():
            raise CheckpointError(
                f"{name}{at} is not in the hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids "
                f"downloading it: run once online (or `hf download {name}`), point HF_HUB_CACHE at a cache that "
                "holds it, or give a local folder") from None
        raise CheckpointError(f"cannot reach the Hugging Face hub to fetch {name}{at}, and it is not in the cache "
                              f"({constants.HF_HUB_CACHE}): {e}") from None
    if weights and not any(folder.glob("*.safetensors")) and not is_offline() \
            and _pickled_only_on_hub(name, revision):
        raise CheckpointError(
            f"{name} publishes pickled weights (*.bin) only, which llmq does not read: convert them once with "
            "transformers (AutoModelForCausalLM.from_pretrained(id).save_pretrained(folder)) and quantize the folder")
    log.info("%s%s: %s", name, at, folder)
    return check_model_folder(folder, f"{name}{at} ({folder})", weights)
