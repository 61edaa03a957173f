"""Feature maps phi for kernel linear attention and HLA factors.

Each map takes ``x`` of shape ``[..., N, d]`` and returns ``[..., N, r]`` so that the factor
similarity is ``phi(q_i) . phi(k_j)``. Maps receive the already-scaled vectors
``sqrt(scale) * q`` (see :mod:`hla_analysis.variants`), so ``q.k`` there is the softmax logit.

Some maps need the token positions (cosFormer) or carry learnable weights (Hedgehog,
ReBased); all are ``nn.Module`` with ``forward(x, *, positions=None, length=None)``.
Which maps exist, their options, positivity, learnability and parameter counts come from
:mod:`hla_analysis.registry`; this module holds only their PyTorch arithmetic.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hla_analysis.ops import feature_blocks
from hla_analysis.ops.tied import symmetric_power_features
from hla_analysis.registry import DEPRECATED_MAP_OPTIONS, FEATURE_MAP_REGISTRY, feature_map_entry


class FeatureMap(nn.Module):
    """Base class. ``positive`` (from the registry) says whether every similarity is >= 0.

    Learnable maps take ``heads``: with it their parameters get a leading head axis, so one
    module serves inputs ``[..., heads, N, d]`` with separate weights per head.
    """

    name = "base"

    @property
    def positive(self) -> bool:
        return FEATURE_MAP_REGISTRY[self.name].positive

    def __init__(self, dim: int, *, heads: int | None = None):
        super().__init__()
        self.dim = dim
        self.heads = heads

    def _per_head(self, value: Tensor, *, row: bool = False) -> nn.Parameter:
        if self.heads is None:
            return nn.Parameter(value)
        value = value.unsqueeze(0) if not row else value.reshape(1, 1, -1)
        return nn.Parameter(value.repeat(self.heads, *([1] * (value.dim() - 1))).contiguous())

    def out_dim(self) -> int:
        raise NotImplementedError

    #: Whether :meth:`similarity` has a direct form (cheaper than the features' product).
    has_similarity = False
    #: Whether a key's features depend on other keys: the sequence length (cosFormer) or a
    #: shift taken over every token (exp, FAVOR+), so dropping keys no row sees would change them.
    reads_all_keys = False
    #: Whether :meth:`forward` reads ``positions``: True unless a map says it ignores them (every
    #: built-in map but cosFormer), so a variant skips building them for the maps that do not.
    uses_positions = True

    def similarity(self, q: Tensor, k: Tensor) -> Tensor:
        """``phi(q) @ phi(k)^T`` ``[..., Nq, Nk]`` computed without the features.

        Maps whose features are much wider than ``d`` (Taylor's and ReBased's quadratic
        ones: ``O(d^2)``) compute the similarity from ``d``-wide products instead
        (``has_similarity``); it equals the features' product up to float rounding.
        Non-finite intermediates are not checked here: an overflow shows as a non-finite
        weight or normalizer, where the features' path would refuse non-finite features.
        """
        raise NotImplementedError(f"the {self.name} map has no direct similarity; use its features.")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, out_dim={self.out_dim()}"


class Identity(FeatureMap):
    """``phi(x) = x``: similarity ``q.k``, sign-indefinite."""

    name = "identity"
    uses_positions = False

    def out_dim(self):
        return self.dim

    def forward(self, x, **_):
        return x


class Elu1(FeatureMap):
    """``phi(x) = elu(x) + 1`` (Katharopoulos et al. 2020): positive."""

    name = "elu1"
    uses_positions = False

    def out_dim(self):
        return self.dim

    def forward(self, x, **_):
        return F.elu(x) + 1


class Relu(FeatureMap):
    """``phi(x) = relu(x)``: non-negative, but a row can get an all-zero normalizer."""

    name = "relu"
    uses_positions = False

    def out_dim(self):
        return self.dim

    def forward(self, x, **_):
        return F.relu(x)


class Exp(FeatureMap):
    """``phi(x) = exp(x - c)`` with ``c`` the (detached) maximum over tokens and features.

    A constant shift multiplies every similarity of a head by the same factor, which the
    row normalisation cancels; it only keeps ``exp`` from overflowing.
    """

    name = "exp"
    uses_positions = False
    reads_all_keys = True  # the shift is the maximum over every token (underflow depends on it)

    def out_dim(self):
        return self.dim

    def forward(self, x, **_):
        shift = x.detach().amax(dim=(-2, -1), keepdim=True)
        return torch.exp(x - shift)


class Affine(FeatureMap):
    """``phi(x) = [1, x / sqrt(c)]``, so that the similarity is ``1 + q.k / c``.

    With ``M`` tied factors and ``c = M`` the HLA weight is ``(1 + s/M)^M -> exp(s)``.
    """

    name = "affine"
    uses_positions = False

    def __init__(self, dim: int, *, c: float = 1.0, heads: int | None = None):
        super().__init__(dim, heads=heads)
        if c <= 0:
            raise ValueError(f"affine feature map needs c > 0, got {c}.")
        self.c = float(c)

    def out_dim(self):
        return self.dim + 1

    def forward(self, x, **_):
        scaled = x / math.sqrt(self.c)
        # the fused split path reads the x block as made, not as a strided slice of the result
        return feature_blocks.record(torch.cat([torch.ones_like(x[..., :1]), scaled], dim=-1),
                                     {(1, x.shape[-1]): scaled})


class Favor(FeatureMap):
    """FAVOR+ positive orthogonal random features (Performer, Choromanski et al. 2021).

    ``phi(x) = exp(W x - |x|^2/2 - c) / sqrt(m)`` (``m = features``) with ``W`` blocks of random orthogonal rows
    scaled to Gaussian norms, so that ``E[phi(q).phi(k)] = exp(q.k)`` (times a constant that
    row normalisation cancels). Seeded: the same ``seed`` gives the same features.
    """

    name = "favor"
    uses_positions = False
    reads_all_keys = True  # the shift is the maximum over every token (underflow depends on it)

    def __init__(self, dim: int, *, features: int = 64, seed: int = 0, heads: int | None = None):
        super().__init__(dim, heads=heads)
        if features < 1:
            raise ValueError(f"FAVOR+ needs features >= 1 random features, got {features}.")
        self.m = int(features)
        g = torch.Generator().manual_seed(int(seed))
        blocks = []
        for _ in range(math.ceil(self.m / dim)):
            gaussian = torch.randn(dim, dim, generator=g, dtype=torch.float64)
            ortho, tri = torch.linalg.qr(gaussian)
            # sign fix: without it LAPACK's convention biases Q, and with it the estimator
            ortho = ortho * torch.sign(torch.diagonal(tri))
            blocks.append(ortho.T)
        w = torch.cat(blocks)[: self.m]
        norms = torch.randn(self.m, dim, generator=g, dtype=torch.float64).norm(dim=-1, keepdim=True)
        self.register_buffer("projection", (w * norms).float())

    def out_dim(self):
        return self.m

    def forward(self, x, **_):
        proj = x @ self.projection.to(x.dtype).T - (x * x).sum(-1, keepdim=True) / 2
        shift = proj.detach().amax(dim=(-2, -1), keepdim=True)
        return torch.exp(proj - shift) / math.sqrt(self.m)


class Taylor(FeatureMap):
    """Based / second-order Taylor: ``[1, x, x(x)x / sqrt(2)]`` so that ``s -> 1 + s + s^2/2``.

    ``x(x)x`` is stored symmetric-packed (``d(d+1)/2`` entries, not ``d^2``).
    """

    name = "taylor"
    uses_positions = False

    has_similarity = True

    def out_dim(self):
        return 1 + self.dim + self.dim * (self.dim + 1) // 2

    def forward(self, x, **_):
        quad = symmetric_power_features(x, 2) / math.sqrt(2)
        return torch.cat([torch.ones_like(x[..., :1]), x, quad], dim=-1)

    def similarity(self, q, k):
        """``1 + s + s^2/2`` with ``s = q.k``, as ``1 + s (1 + s/2)`` (>= 1/2 for every s)."""
        s = q @ k.transpose(-1, -2)
        half = torch.mul(s, 0.5).add_(1.0)
        return (half * s if s.requires_grad else half.mul_(s)).add_(1.0)  # in place when no graph needs s


class CosFormer(FeatureMap):
    """cosFormer: ``relu(x)`` re-weighted by ``cos``/``sin`` of ``pi i / (2 L)``.

    ``phi(x_i) = [relu(x_i) cos(pi i / 2L), relu(x_i) sin(pi i / 2L)]`` gives the similarity
    ``relu(q_i).relu(k_j) cos(pi (i - j) / 2L)``, with ``L`` the sequence length.
    """

    name = "cosformer"
    reads_all_keys = True  # positions are scaled by the sequence length
    uses_positions = True

    def out_dim(self):
        return 2 * self.dim

    def forward(self, x, *, positions: Tensor | None = None, length: int | None = None, **_):
        n = x.shape[-2]
        if positions is None:
            positions = torch.arange(n, device=x.device)
        length = n if length is None else length
        angle = (math.pi / 2) * positions.to(x.dtype) / length
        base = F.relu(x)
        return torch.cat([base * angle.cos()[:, None], base * angle.sin()[:, None]], dim=-1)


class Hedgehog(FeatureMap):
    """Hedgehog (Zhang et al. 2024): learnable ``[softmax(W x), softmax(-W x)]``.

    ``W`` starts at the identity; fit it with :mod:`hla_analysis.fit`.
    """

    name = "hedgehog"
    uses_positions = False

    def __init__(self, dim: int, *, heads: int | None = None):
        super().__init__(dim, heads=heads)
        self.weight = self._per_head(torch.eye(dim))

    def out_dim(self):
        return 2 * self.dim

    def forward(self, x, **_):
        # half-precision inputs: the projection and softmax run in float32 (a softmax's backward
        # is a difference of nearly equal terms), and only the features are stored at x's dtype
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        z = work @ self.weight.to(work.dtype).transpose(-1, -2)
        return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], dim=-1).to(x.dtype)


class ReBased(FeatureMap):
    """ReBased (Aksenov et al. 2024): ``(gamma * norm(x) + beta)^(x)2``, similarity ``(q~.k~)^2``.

    Learnable ``gamma``, ``beta`` (start at 1 and 0); the square is symmetric-packed.
    """

    name = "rebased"
    uses_positions = False

    def __init__(self, dim: int, *, heads: int | None = None):
        super().__init__(dim, heads=heads)
        self.gamma = self._per_head(torch.ones(dim), row=True)
        self.beta = self._per_head(torch.zeros(dim), row=True)

    has_similarity = True

    def out_dim(self):
        return self.dim * (self.dim + 1) // 2

    def _normed(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.dim,)) * self.gamma.to(x.dtype) + self.beta.to(x.dtype)

    def forward(self, x, **_):
        return symmetric_power_features(self._normed(x), 2)

    def similarity(self, q, k):
        """``(q~.k~)^2`` from the d-wide normed vectors (not the d(d+1)/2-wide features)."""
        s = self._normed(q) @ self._normed(k).transpose(-1, -2)
        return s.square() if s.requires_grad else s.square_()


_CLASSES = {
    cls.__name__: cls for cls in (Identity, Elu1, Relu, Exp, Affine, Favor, Taylor, CosFormer, Hedgehog, ReBased)
}
#: The PyTorch class of every registered map, in the registry's order.
FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    name: _CLASSES[entry.torch] for name, entry in FEATURE_MAP_REGISTRY.items()
}
assert all(cls.name == name for name, cls in FEATURE_MAPS.items()), "class names disagree with the registry"


def make_feature_map(name: str, dim: int, *, heads: int | None = None, **options) -> FeatureMap:
    """Build a registered feature map by name, with its options checked against the registry.

    Examples
    --------
    >>> phi = make_feature_map("affine", 4, c=2)
    >>> x = torch.ones(1, 4)
    >>> float(phi(x) @ phi(x).T)   # 1 + x.x / 2
    3.0
    """
    entry = feature_map_entry(name)
    for old, new in DEPRECATED_MAP_OPTIONS.get(name, {}).items():
        if old in options:
            if new in options:
                raise ValueError(f"feature map {name!r} got both {old}= and {new}=; pass {new}= only.")
            warnings.warn(f"{name} feature map: {old}= is deprecated, pass {new}=.", DeprecationWarning, stacklevel=2)
            options[new] = options.pop(old)
    return FEATURE_MAPS[name](dim, heads=heads, **entry.check_options(options))
