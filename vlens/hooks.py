"""Hook names: one canonical name per hook point, and every form of ``names_filter``.

TransformerLens's bridge registers each hook point under its module path
(``blocks.0.hook_in``) and, for many, under HookedTransformer aliases as well
(``blocks.0.hook_resid_pre``): the same ``HookPoint`` object under two names. vlens
keeps one canonical name per hook point, the HookedTransformer alias when there is one
(what a TransformerLens user types), and accepts every other name as an alias.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from torch import Tensor

from vlens._tl import HookPoint
from vlens.errors import HookNameError, closest

NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]

_GLOB_CHARS = set("*?[")

# HookedTransformer's vocabulary: where the bridge offers one of these as an alias, that
# alias is what a TransformerLens user types, so it becomes the canonical name. Other
# bridge aliases (e.g. ``vision_projector.hook_vision_proj_out``) add nothing over the
# module-path name and stay aliases.
HOOKED_TRANSFORMER_NAMES = frozenset(
    {
        "hook_embed", "hook_pos_embed", "hook_unembed", "hook_resid_pre", "hook_resid_mid",
        "hook_resid_post", "hook_attn_in", "hook_attn_out", "hook_mlp_in", "hook_mlp_out",
        "hook_q", "hook_k", "hook_v", "hook_z", "hook_pattern", "hook_attn_scores", "hook_result",
        "hook_pre", "hook_post", "hook_pre_linear", "hook_q_input", "hook_k_input", "hook_v_input",
        "hook_scale", "hook_normalized", "hook_rot_q", "hook_rot_k",
    }
)


@dataclass(frozen=True)
class HookIndex:
    """Every hook point of a bridge under its canonical name, plus the alias map."""

    points: dict[str, HookPoint]
    aliases: dict[str, str]

    @classmethod
    def from_bridge(cls, hook_dict: dict[str, HookPoint]) -> "HookIndex":
        names_of: dict[int, list[str]] = {}
        point_of: dict[int, HookPoint] = {}
        for name, point in hook_dict.items():
            names_of.setdefault(id(point), []).append(name)
            point_of[id(point)] = point
        points: dict[str, HookPoint] = {}
        aliases: dict[str, str] = {}
        for key, names in names_of.items():
            point = point_of[key]
            # HookPoint.name is the module-path name; other keys are aliases.
            ht_style = [n for n in names if n != point.name and n.rsplit(".", 1)[-1] in HOOKED_TRANSFORMER_NAMES]
            canonical = ht_style[0] if ht_style else (point.name if point.name in names else names[0])
            points[canonical] = point
            for n in names:
                if n != canonical:
                    aliases[n] = canonical
        return cls(points=points, aliases=aliases)

    def all_names(self) -> list[str]:
        return [*self.points, *self.aliases]

    def canonical(self, name: str) -> str:
        """The canonical name of any hook name or alias (raises ``HookNameError`` when unknown)."""
        if name in self.points:
            return name
        if name in self.aliases:
            return self.aliases[name]
        suggestions = closest(name, self.all_names())
        hint = f"; closest: {suggestions}" if suggestions else ""
        raise HookNameError(f"no hook named {name!r} on this model{hint}. List them with model.hook_names()")

    def resolve(self, names_filter: NamesFilter) -> list[str]:
        """The canonical names a ``names_filter`` selects, in forward order of registration.

        Accepts None (every hook), a name, a glob (``"blocks.*.hook_resid_post"``), a list
        of names and globs, or a predicate on names. A name or glob matching nothing
        raises ``HookNameError``; so does a predicate that selects nothing.
        """
        if names_filter is None:
            return list(self.points)
        if isinstance(names_filter, str):
            return self._resolve_patterns([names_filter])
        if callable(names_filter):
            chosen = {self.canonical(n) for n in self.all_names() if names_filter(n)}
            if not chosen:
                raise HookNameError("the names_filter predicate selected no hook on this model")
            return [n for n in self.points if n in chosen]
        if isinstance(names_filter, Iterable):
            items = list(names_filter)
            bad = [item for item in items if not isinstance(item, str)]
            if bad:
                raise HookNameError(f"names_filter list items must be hook names or globs, got {bad!r}")
            return self._resolve_patterns(items)
        raise HookNameError(
            f"names_filter must be None, a hook name, a glob, a list of them or a callable, got {type(names_filter).__name__}"
        )

    def _resolve_patterns(self, patterns: list[str]) -> list[str]:
        chosen: set[str] = set()
        for pattern in patterns:
            if _GLOB_CHARS & set(pattern):
                matched = {self.canonical(n) for n in fnmatch.filter(self.all_names(), pattern)}
                if not matched:
                    hint = closest(pattern.replace("*", "0"), self.all_names())
                    raise HookNameError(
                        f"glob {pattern!r} matches no hook on this model"
                        + (f"; names like it: {hint}" if hint else "")
                    )
                chosen |= matched
            else:
                chosen.add(self.canonical(pattern))
        return [n for n in self.points if n in chosen]


def stage_of(name: str, stage_prefixes: dict[str, tuple[str, ...]]) -> Optional[str]:
    """Which model stage (vision, connector, language, ...) a canonical hook name belongs to."""
    for stage, prefixes in stage_prefixes.items():
        if any(name.startswith(p) for p in prefixes):
            return stage
    return None


def hooked_tensor(value: Any) -> Optional[Tensor]:
    """The tensor a hook function received: the value itself, the first element of a tuple
    (some hook points carry ``(hidden, ...)``), or None when there is no tensor."""
    if isinstance(value, tuple):
        value = value[0] if value and isinstance(value[0], Tensor) else None
    return value if isinstance(value, Tensor) else None
