"""The dependency versions vlens is tested on, and the one place that bridges their differences.

transformers 5.24 renamed the key/value cache argument of every forward, down to each attention
module, from ``past_key_values`` to ``cache`` (and the output field likewise). TransformerLens
4.3's attention components that compute attention themselves (``PositionEmbeddingsAttentionBridge``
and its kin) read the cache only as ``past_key_values`` / ``layer_past``: under 5.24 they neither
write nor read it, so cached generation goes wrong after the first token and a prefix cache comes
back empty, while every single full forward stays exact. vlens does not edit the installed
TransformerLens; it hands those components the cache under the name they read, through a forward
pre-hook (:func:`route_layer_cache`), and checks with a forward that the cache is really filled
(:func:`layer_cache_problem`) before any path that depends on it runs.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from packaging.version import Version

if TYPE_CHECKING:
    import torch

    from vlens.model import HookedVLM


@dataclass(frozen=True)
class TestedRange:
    """Versions of one dependency vlens was tested on: ``oldest <= v < below``.

    ``below`` is the next minor release after the newest one tested, so patch releases of a
    tested minor are inside (CI also runs the newest release inside the range).
    """

    package: str
    oldest: str
    newest: str
    below: str

    def contains(self, version: str) -> bool:
        v = Version(version)
        # A pre-release of ``below`` (5.25.0rc1) is untested too, as pip's ``<5.25`` also says.
        return Version(self.oldest) <= v and Version(v.base_version) < Version(self.below)

    @property
    def specifier(self) -> str:
        """The requirement specifier pyproject.toml declares, e.g. ``>=5.23.0,<5.25``."""
        return f">={self.oldest},<{self.below}"


TESTED: tuple[TestedRange, ...] = (
    TestedRange("transformers", oldest="5.23.0", newest="5.24.0", below="5.25"),
    TestedRange("transformer-lens", oldest="4.3.0", newest="4.3.0", below="4.4"),
)
"""The ranges pyproject.toml declares (a unit test keeps the two equal)."""


class UntestedVersionWarning(UserWarning):
    """An installed dependency lies outside the versions vlens was tested on."""


def installed_version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def untested_versions() -> list[str]:
    """One sentence per installed dependency outside its tested range (empty when all are inside)."""
    found = []
    for tested in TESTED:
        version = installed_version(tested.package)
        if version is not None and not tested.contains(version):
            found.append(
                f"{tested.package} {version} is installed, but vlens was tested on {tested.package} "
                f"{tested.oldest} to {tested.newest} ({tested.specifier})"
            )
    return found


def warn_untested_versions() -> None:
    """Warn once per process about dependencies outside the tested ranges (``import vlens`` calls it).

    People install with ``--no-deps``, conda or a pinned environment, where pip's resolver never
    saw vlens's bounds.
    """
    for sentence in untested_versions():
        warnings.warn(
            f"{sentence}; results may be wrong or slow without an error. Install a tested version "
            "(pip install 'vlens' resolves one) or run vlens's parity tests on this one.",
            UntestedVersionWarning,
            stacklevel=3,
        )


# ---- the key/value cache argument --------------------------------------------------------


def cache_argument(module: torch.nn.Module) -> str:
    """The name under which ``module``'s forward takes a key/value cache (``cache`` from
    transformers 5.24, ``past_key_values`` before)."""
    return _cache_argument_of(type(module))


@functools.cache
def _cache_argument_of(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    if "cache" in params:
        return "cache"
    return "past_key_values"


def output_cache(output: Any) -> Any:
    """The key/value cache of a Hugging Face model output (None when it returned none)."""
    for name in ("cache", "past_key_values"):
        if name in output.keys():
            return output[name]
    return None


# ---- handing the layer cache to TransformerLens's own attention components ---------------------


def route_layer_cache(bridge: torch.nn.Module) -> int:
    """Make the bridge's self-computing attention components see the layer cache.

    Each TransformerLens attention component that overrides ``AttentionBridge.forward``
    computes attention itself and reads the cache as ``past_key_values`` (or ``layer_past``);
    one that keeps ``AttentionBridge.forward`` hands every argument to the Hugging Face module,
    which reads the name its own transformers uses. Under a transformers that passes ``cache``,
    a pre-hook on each component of the first kind renames it. Components vlens defines
    itself (the query-connector bridge of ``vlens/adapters``) receive no cache. Returns how many components were hooked.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    hooked = 0
    for module in bridge.modules():
        cls = type(module)
        if not isinstance(module, AttentionBridge) or cls.forward is AttentionBridge.forward:
            continue
        if not cls.__module__.startswith("transformer_lens."):
            continue
        module.register_forward_pre_hook(_rename_cache_argument, with_kwargs=True)
        hooked += 1
    return hooked


def _rename_cache_argument(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if "cache" in kwargs and "past_key_values" not in kwargs:
        kwargs = dict(kwargs)
        kwargs["past_key_values"] = kwargs.pop("cache")
    return args, kwargs


def layer_cache_problem(model: "HookedVLM") -> Optional[str]:
    """Why the language model's key/value cache is unusable, or None when it works.

    Runs the language model once on two text-token embeddings with ``use_cache=True`` and
    checks every layer cached both positions. Sliding-window layers keep only recent positions,
    which two tokens never exceed. The answer is kept on the model (one check per model).
    """
    known = getattr(model, "_layer_cache_problem", ...)
    if known is not ...:
        return known
    problem = _probe_layer_cache(model)
    model._layer_cache_problem = problem
    return problem


def _probe_layer_cache(model: "HookedVLM") -> Optional[str]:
    import torch  # here: `import vlens` (the CLI's --help) does not load torch

    from vlens._modules import input_embeddings

    ids = torch.zeros(1, 2, dtype=torch.long, device=model.device)  # any two text tokens will do
    embeds = input_embeddings(model.hf_model)(ids)
    with torch.no_grad():
        _, cache = model.run_language_model(
            embeds, model.adapter.text_positions(2, model.device)[None], attention_mask=torch.ones_like(ids),
            use_cache=True,
        )
    versions = ", ".join(f"{t.package} {installed_version(t.package)}" for t in TESTED)
    if cache is None:
        return f"the language model returned no key/value cache ({versions})"
    layers = getattr(cache, "layers", None)
    if not layers:
        return f"the language model returned a cache with no layers ({versions})"
    lengths = [None if getattr(layer, "keys", None) is None else int(layer.keys.shape[-2]) for layer in layers]
    if any(n != 2 for n in lengths):
        return (
            f"the language model's layer cache was not filled (positions cached per layer {lengths}, expected 2 "
            f"each; {versions})"
        )
    return None
