"""One entry per feature map: what every layer (spec parser, torch, SymPy, tables) reads.

An entry names the map's options (type, default, the condition a value must meet), its
PyTorch class in :mod:`hla_analysis.feature_maps`, its SymPy function in
:mod:`hla_analysis.symbolic.feature_maps`, whether its similarity is >= 0 by construction,
whether it has parameters to fit, and how many per head. The module imports neither torch
nor SymPy, so parsing a spec costs neither; the two sides look their implementation up by
the names given here, and ``tests/test_feature_maps.py`` checks every entry against both.

Examples
--------
>>> FEATURE_MAP_REGISTRY["favor"].defaults()
{'features': 64, 'seed': 0}
>>> FEATURE_MAP_REGISTRY["hedgehog"].params_per_head(8)
64
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MapOption:
    """One option of a feature map: parser, default, and the condition a value must meet."""

    type: type
    default: object
    check: Callable[[object], bool] = lambda value: True
    requirement: str = ""


@dataclass(frozen=True)
class FeatureMapEntry:
    """A feature map as every layer sees it.

    ``torch`` names the class in :mod:`hla_analysis.feature_maps`, ``sympy`` the function in
    :mod:`hla_analysis.symbolic.feature_maps`. ``positive``: every similarity is >= 0 for any
    input. ``learnable``: parameters to fit; ``params`` gives their count per head for head
    dim ``d``. ``positional``: the map reads token positions (symbolically, an angle).
    """

    name: str
    torch: str
    sympy: str
    positive: bool
    learnable: bool = False
    params: Callable[[int], int] = lambda d: 0
    options: dict[str, MapOption] = field(default_factory=dict)
    positional: bool = False
    summary: str = ""

    def defaults(self) -> dict:
        return {key: option.default for key, option in self.options.items()}

    def params_per_head(self, dim: int) -> int:
        return self.params(dim)

    def check_options(self, options: dict, *, where: str = "") -> dict:
        """``options`` completed with defaults; raises for unknown keys or bad values."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(self.options) or "no options"
            raise ValueError(
                f"feature map phi={self.name} does not take {', '.join(unknown)}{where}; it takes {takes}."
            )
        out = self.defaults()
        for key, value in options.items():
            option = self.options[key]
            if not option.check(value):
                raise ValueError(f"{key} must be {option.requirement}, got {value}{where}.")
            out[key] = value
        return out


def _positive_int(value) -> bool:
    return isinstance(value, int) and value >= 1


def _positive_finite(value) -> bool:
    return math.isfinite(value) and value > 0


_C = MapOption(float, 1.0, _positive_finite, "a finite number > 0 (similarity 1 + s/c)")
# FAVOR+ with more random features than this is no longer a linear-attention approximation of
# practical size (the kernels take 4,096 features; a [N, features] map per head must fit memory)
MAX_FAVOR_FEATURES = 65536
_FEATURES = MapOption(int, 64, lambda v: _positive_int(v) and v <= MAX_FAVOR_FEATURES,
                      f"an integer in 1..{MAX_FAVOR_FEATURES} (favor's random features)")
def _seed(value) -> bool:
    return isinstance(value, int) and 0 <= value < 2**63  # what torch.Generator.manual_seed takes


_SEED = MapOption(int, 0, _seed, "an integer in [0, 2**63)")

FEATURE_MAP_REGISTRY: dict[str, FeatureMapEntry] = {
    entry.name: entry
    for entry in (
        FeatureMapEntry("identity", "Identity", "_identity", positive=False, summary="q.k, sign-indefinite"),
        FeatureMapEntry("elu1", "Elu1", "_elu1", positive=True, summary="elu(x) + 1"),
        FeatureMapEntry("relu", "Relu", "_relu", positive=True, summary="relu(x); a row can get a zero normalizer"),
        FeatureMapEntry("exp", "Exp", "_exp", positive=True, summary="exp(x), stabilised"),
        # affine similarities 1 + s/c change sign; an even number of tied factors is >= 0,
        # which is the variant's business (spec.VariantSpec.positive), not the map's
        FeatureMapEntry("affine", "Affine", "_affine", positive=False, options={"c": _C},
                        summary="[1, x/sqrt(c)]: similarity 1 + s/c"),
        FeatureMapEntry("favor", "Favor", "_favor", positive=True, options={"features": _FEATURES, "seed": _SEED},
                        summary="FAVOR+ positive orthogonal random features, seeded"),
        FeatureMapEntry("taylor", "Taylor", "_taylor", positive=True, summary="Based: 1 + s + s^2/2"),
        FeatureMapEntry("cosformer", "CosFormer", "_cosformer", positive=True, positional=True,
                        summary="relu(x) re-weighted by cos/sin of the position"),
        FeatureMapEntry("hedgehog", "Hedgehog", "_hedgehog", positive=True, learnable=True, params=lambda d: d * d,
                        summary="[softmax(Wx), softmax(-Wx)], W learnable (d x d)"),
        FeatureMapEntry("rebased", "ReBased", "_rebased", positive=True, learnable=True, params=lambda d: 2 * d,
                        summary="(gamma norm(x) + beta)^2, gamma and beta learnable"),
    )
}

#: Old option names a map still accepts for one release: ``{map: {old: new}}``.
DEPRECATED_MAP_OPTIONS = {"favor": {"m": "features"}}


def feature_map_entry(name: str) -> FeatureMapEntry:
    """The registry entry of ``name``; a ``ValueError`` naming the known maps otherwise."""
    if name not in FEATURE_MAP_REGISTRY:
        raise ValueError(f"unknown feature map {name!r}; choose one of {', '.join(FEATURE_MAP_REGISTRY)}.")
    return FEATURE_MAP_REGISTRY[name]
