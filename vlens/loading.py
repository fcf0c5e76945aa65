"""Resolving a model name, device and dtype, and loading the pieces of a ``HookedVLM``.

The path a hub checkpoint takes and the path a local folder takes are the same:
``AutoConfig`` → family adapter → the family's Hugging Face class with eager attention
→ ``AutoProcessor`` → a TransformerLens bridge built around the loaded module with
``build_bridge_from_module``. vlens never calls TransformerLens's own ``boot``: that
path installs packages in a subprocess when a processor fails to load, and can only
reach architectures listed inside TransformerLens.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch

from vlens.errors import CheckpointNotFoundError, DeviceError, UnsupportedArchitectureError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    """A torch floating dtype from a dtype or its usual names (default float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise DeviceError(f"dtype {dtype} cannot hold model weights; use float32, float16 or bfloat16")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise DeviceError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype")


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    """A usable torch device (default: cuda if available, else cpu)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"device {device!r} is not a device torch knows ({err}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} asked for CUDA, but torch sees no CUDA GPU here; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceError(f"device {device!r} asked for MPS, which is not available here; use 'cpu'")
    elif dev.type != "cpu":
        raise DeviceError(f"device {device!r} is not supported; use 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return dev


def resolve_checkpoint(name_or_path: Union[str, os.PathLike]) -> str:
    """A local folder or hub id to load from; ``"toy"`` is the checkpoint vlens ships.

    Raises:
        CheckpointNotFoundError: for a local path that is missing, is a file, or has
            no ``config.json``.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise CheckpointNotFoundError(
            f"model name must be a string or path, got {type(name_or_path).__name__}"
        )
    name = os.fspath(name_or_path)
    if name == "toy":
        from vlens.zoo import toy_checkpoint_path

        name = str(toy_checkpoint_path())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointNotFoundError(f"checkpoint path {name!r} is a file; pass the folder holding config.json")
        if not (path / "config.json").is_file():
            raise CheckpointNotFoundError(
                f"checkpoint folder {name!r} has no config.json; pass a folder written by save_pretrained"
            )
        return str(path)
    if _HUB_ID.match(name) and not name.startswith((".", "~")):
        return _hub_source(name)
    raise CheckpointNotFoundError(
        f"checkpoint {name!r} is not an existing folder nor a hub id of the form 'org/name'; pass a local "
        "folder written by save_pretrained, a hub id, or 'toy'"
    )


def _hub_source(repo_id: str) -> str:
    """A hub id to download from, or its cached snapshot folder when the hub cannot be used.

    Where the hub is off (``HF_HUB_OFFLINE``) or cannot be reached, Hugging Face retries for
    about half a minute before saying the model is missing; here the answer comes at once,
    from the local cache or as an error.
    """
    from huggingface_hub import constants

    # The environment as it is now: huggingface_hub reads it once, when first imported.
    flag = os.environ.get("HF_HUB_OFFLINE")
    offline = constants.HF_HUB_OFFLINE if flag is None else flag.strip().lower() in ("1", "true", "yes", "on")
    if not offline and hub_reachable(constants.ENDPOINT):
        return repo_id  # Hugging Face resolves (and downloads) it
    cached = _cached_snapshot(repo_id)
    if cached is not None:
        return cached
    why = "HF_HUB_OFFLINE is set" if offline else f"the hub at {constants.ENDPOINT} cannot be reached"
    raise CheckpointNotFoundError(
        f"checkpoint {repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
        "download it where there is a network (huggingface-cli download), or pass a local folder or 'toy'"
    )


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds.

    Behind a proxy the direct connection says nothing, so the hub is assumed reachable there and
    Hugging Face's own client decides.
    """
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_snapshot(repo_id: str) -> Optional[str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return folder if (Path(folder) / "config.json").is_file() else None


def load_config(source: str) -> Any:
    """The checkpoint's Hugging Face config, with errors that say what is wrong with the source."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except OSError as err:
        raise CheckpointNotFoundError(f"cannot read a model config from {source!r}: {err}") from None
    except Exception as err:  # transformers validates configs with several error types
        if "json" in type(err).__name__.lower() or "Expecting" in str(err):
            raise CheckpointNotFoundError(f"cannot read a model config from {source!r}: {err}") from None
        raise UnsupportedArchitectureError(f"the model config in {source!r} is not valid: {err}") from None


def load_processor(source: str, video_processor_class: Optional[str] = None) -> Any:
    """The checkpoint's processor (tokenizer and image processor); for a family whose processor
    also has a video part (``video_processor_class``, the adapter's), that class for images
    only where torchvision cannot be imported."""
    from vlens.adapters._processors import load_family_processor

    try:
        return load_family_processor(source, video_processor_class)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointNotFoundError(
            f"cannot load the processor (tokenizer + image processor) of {source!r}: {err}"
        ) from None


def load_hf_model(
    model_class: type,
    source: str,
    dtype: torch.dtype,
    device: Optional[torch.device],
    device_map: Any,
) -> torch.nn.Module:
    """The Hugging Face model in eval mode with eager attention (hooks see attention patterns)."""
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "eager"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    from vlens._quiet import weight_loading_bar

    try:
        with weight_loading_bar(source):  # no progress bar for a checkpoint that loads in a blink
            model = model_class.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise CheckpointNotFoundError(f"cannot load {model_class.__name__} weights from {source!r}: {err}") from None
    if device_map is None and device is not None:
        model = model.to(device)
    return model.eval()
