"""Loading a family's processor for images where transformers cannot build its video part.

Several families' processors (Qwen-VL, LLaVA-OneVision, SmolVLM, ...) hold a video
processor beside the image processor and the tokenizer. transformers builds video processors
only with torchvision, and ``AutoProcessor`` refuses the whole processor without it, although
the image processors fall back to PIL. vlens analyses images, so where torchvision cannot be
imported it loads the family's own processor class with its real image processor and
tokenizer and no video processor, says so once, and refuses video inputs; where torchvision
works, ``AutoProcessor`` loads the full processor as usual.

Pixtral's processor (Mistral3) has no video part, but transformers declares the class
torchvision-only and its module imports one helper from the torchvision image processor;
:func:`processor_class` imports the real class with the PIL module's twin of that helper,
and it is loaded with its tokenizer and the PIL image processor.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys
import warnings
from typing import Any, Iterator

from vlens.errors import UnsupportedArchitectureError

VIDEO_ONLY_IMPORTS: tuple[str, ...] = ("num2words",)
"""Optional packages a processor module imports for video prompts only, and whose absence its
``__init__`` nevertheless refuses (SmolVLM's spells a video's frame count in words with
``num2words``, and raises ImportError without it even for images)."""


@contextlib.contextmanager
def video_only_imports_absent(processor_class: type) -> Iterator[None]:
    """While a processor of ``processor_class`` is built: each package of
    :data:`VIDEO_ONLY_IMPORTS` that its module failed to import (left as None) is stood in for
    by a function that raises a clear ImportError when a video prompt calls it, so that the
    ``__init__``'s check passes for images. The module is restored on exit."""
    module = sys.modules.get(processor_class.__module__)
    absent = [name for name in VIDEO_ONLY_IMPORTS if module is not None and name in vars(module)
              and getattr(module, name) is None]
    for name in absent:
        setattr(module, name, _missing_package(name, processor_class.__name__))
    try:
        yield
    finally:
        for name in absent:
            setattr(module, name, None)


def _missing_package(name: str, processor_class_name: str) -> Any:
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise ImportError(f"{processor_class_name} needs the package {name!r} for video prompts; install it")

    return missing


class VideoProcessorUnavailableWarning(UserWarning):
    """A processor was loaded for images only, because torchvision cannot be imported."""


@functools.cache
def torchvision_problem() -> str | None:
    """Why torchvision cannot be used here (None when it imports): a missing package, or a
    build that does not match the installed torch (``operator torchvision::nms does not exist``)."""
    try:
        import torchvision  # noqa: F401  # pyright: ignore[reportMissingImports]
    except Exception as err:  # a mismatched build raises RuntimeError at import
        return f"{type(err).__name__}: {err}"
    return None


@functools.cache
def images_only(processor_class: type) -> type:
    """A subclass of ``processor_class`` without its video processor.

    transformers finds a processor's parts from its ``__init__`` signature; this one's lists
    every part but ``video_processor`` and hands the parent ``video_processor=None``. Saved,
    it writes the parent's name as its ``processor_class``, so a folder it writes loads with
    ``AutoProcessor`` where torchvision is installed.
    """
    signature = inspect.signature(processor_class.__init__)
    if "video_processor" not in signature.parameters:
        return processor_class
    parameters = [p for name, p in signature.parameters.items() if name != "video_processor"]
    own_signature = signature.replace(parameters=parameters)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        named = dict(own_signature.bind(self, *args, **kwargs).arguments)
        named.pop("self")
        extra = named.pop("kwargs", {})
        processor_class.__init__(self, video_processor=None, **named, **extra)  # pyright: ignore[reportCallIssue]

    def to_dict(self: Any) -> dict[str, Any]:
        out = processor_class.to_dict(self)
        out["processor_class"] = processor_class.__name__
        return out

    __init__.__signature__ = own_signature  # type: ignore[attr-defined]
    return type(f"{processor_class.__name__}ImagesOnly", (processor_class,), {
        "__init__": __init__,
        "to_dict": to_dict,
        "__doc__": f"{processor_class.__name__} with its image processor and tokenizer and no video processor.",
    })


def load_images_only(source: str, processor_class: type) -> Any:
    """``processor_class`` loaded from ``source`` without its video processor: its own
    settings (``processor_config.json``, chat template), the tokenizer and image processor
    through the Auto classes."""
    from transformers import AutoImageProcessor, AutoTokenizer

    cls = images_only(processor_class)
    settings, _ = processor_class.get_processor_dict(source)
    parts: dict[str, Any] = {}
    for name in cls.get_attributes():
        if name == "tokenizer":
            parts[name] = AutoTokenizer.from_pretrained(source)
        elif name == "image_processor":
            parts[name] = AutoImageProcessor.from_pretrained(source)
        else:
            raise UnsupportedArchitectureError(
                f"{processor_class.__name__} has a part {name!r} that vlens cannot load without torchvision"
            )
    accepted = inspect.signature(cls.__init__).parameters
    options = {k: v for k, v in settings.items() if k in accepted and k not in parts and k != "self"}
    return cls(**parts, **options)


# Processor modules that import, at import time, one helper from an image-processing module
# that needs torchvision, although the PIL image-processing module beside it defines the
# same helper (same name, same code): processor class -> (its module, the torchvision
# module, the PIL module). transformers 5.23-5.24: ``processing_pixtral`` imports
# ``get_resize_output_image_size`` (used only to count tokens for serving engines).
TORCHVISION_HELPER_IMPORTS: dict[str, tuple[str, str, str]] = {
    "PixtralProcessor": (
        "transformers.models.pixtral.processing_pixtral",
        "transformers.models.pixtral.image_processing_pixtral",
        "transformers.models.pixtral.image_processing_pil_pixtral",
    ),
}


def processor_class(name: str) -> type:
    """The transformers processor class ``name``, importable without torchvision.

    transformers exposes a class that declares torchvision among its backends as a
    placeholder that raises when torchvision is missing, and a processor module whose import
    reaches a torchvision module fails outright. For the modules in
    :data:`TORCHVISION_HELPER_IMPORTS` the module is imported with the PIL module standing in
    for the torchvision one during that import only (``sys.modules`` is restored after it),
    so the real class, with its own code, is returned.
    """
    import transformers
    from transformers import ProcessorMixin

    found = getattr(transformers, name, None)
    if isinstance(found, type) and issubclass(found, ProcessorMixin):
        return found
    if name not in TORCHVISION_HELPER_IMPORTS:
        raise UnsupportedArchitectureError(
            f"transformers has no usable processor class {name!r} here (torchvision: {torchvision_problem()})"
        )
    module_name, torchvision_module, pil_module = TORCHVISION_HELPER_IMPORTS[name]
    module = sys.modules.get(module_name)
    if module is None:
        saved = sys.modules.get(torchvision_module)
        sys.modules[torchvision_module] = importlib.import_module(pil_module)
        try:
            module = importlib.import_module(module_name)
        finally:
            if saved is None:
                del sys.modules[torchvision_module]
            else:
                sys.modules[torchvision_module] = saved
    return getattr(module, name)


def load_family_processor(source: str, processor_class_name: str | None) -> Any:
    """The processor of ``source``: ``AutoProcessor``'s, or, for a family whose processor has a
    video part (``processor_class_name``) where torchvision cannot be imported, that class for
    images only (with one :class:`VideoProcessorUnavailableWarning` saying so)."""
    import transformers

    if processor_class_name is None:
        return transformers.AutoProcessor.from_pretrained(source)
    problem = torchvision_problem()
    if problem is None:
        with video_only_imports_absent(getattr(transformers, processor_class_name)):
            return transformers.AutoProcessor.from_pretrained(source)
    cls = processor_class(processor_class_name)
    with video_only_imports_absent(cls):
        processor = load_images_only(source, cls)
    if images_only(cls) is cls:  # no video part: only the class's declared backend needed torchvision
        _warn_without_torchvision(processor_class_name, problem)
    else:
        _warn_images_only(processor_class_name, problem)
    return processor


@functools.cache
def _warn_without_torchvision(processor_class_name: str, problem: str) -> None:
    warnings.warn(
        f"torchvision cannot be imported here ({problem}), and transformers offers {processor_class_name} only with "
        "it: vlens loaded that class itself, with its tokenizer and the PIL version of its image processor. "
        "Images are processed as Hugging Face processes them (the PIL backend); install the torchvision build "
        "that matches your torch for the torchvision backend.",
        VideoProcessorUnavailableWarning,
        stacklevel=3,
    )


@functools.cache
def _warn_images_only(processor_class_name: str, problem: str) -> None:
    warnings.warn(
        f"torchvision cannot be imported here ({problem}), and transformers builds video processors only with "
        f"it: vlens loaded {processor_class_name} for images only (its image processor and tokenizer, no video "
        "processor), so video inputs are refused. Images are unaffected. To process videos, install the "
        "torchvision build that matches your torch.",
        VideoProcessorUnavailableWarning,
        stacklevel=3,
    )
