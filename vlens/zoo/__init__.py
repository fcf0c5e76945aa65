"""The embedded toy VLM ("toy") and the recipe that trains it (`python -m vlens.zoo.train`)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def toy_checkpoint_path() -> Path:
    """Folder of the shipped toy checkpoint (model, processor, tokenizer, chat template).

    Returns:
        A path that ``LlavaForConditionalGeneration.from_pretrained`` and
        ``AutoProcessor.from_pretrained`` accept.

    Raises:
        FileNotFoundError: If the package was installed without its ``zoo/toy`` data files.
    """
    folder = resources.files("vlens.zoo") / "toy"
    path = Path(str(folder))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the toy checkpoint is missing from {path}; reinstall vlens with its package data "
            "(pyproject: [tool.setuptools.package-data] vlens = ['zoo/toy/*'])"
        )
    return path


__all__ = ["toy_checkpoint_path"]
