"""A tensor of SymPy expressions that the shipped torch code accepts as an input.

:class:`SymbolicTensor` wraps a NumPy object array of SymPy expressions and implements the
few tensor operations the efficient HLA forms of :mod:`hla_analysis.ops.hla` use: slicing
(also by integer tensors), ``shape``, ``unsqueeze``, ``flatten``, ``unflatten``,
``transpose``, ``tril``, ``+``, ``*``, ``@``, and through ``__torch_function__``
``torch.einsum``, ``torch.cat`` and a real tensor on the left of ``*``, ``+`` or ``@``.
Those functions then run unchanged on symbols, and their output can be expanded against
the materialized map (:mod:`hla_analysis.symbolic.efficient_forms`).

Every other torch function, method or truth test raises: a proof never falls back to
numbers. NumPy's broadcasting, reshaping (row-major) and ``matmul`` rules are torch's for
these operations; the tests check each one against torch on numbers.

Constants that the shipped code builds as real tensors (``symmetric_power_features``'s
``sqrt`` of multinomial counts) are read back exactly: integers, short binary fractions,
and the correctly rounded square root of a non-square integer ``n`` as ``sqrt(n)``.
Any other float raises, since it has no exact value to prove with.

Examples
--------
>>> a = SymbolicTensor.symbols("a", (2, 2))
>>> gram = (a @ a.transpose(-1, -2)).tril()
>>> gram[1, 0].item(), gram[0, 1].item()
(a_00*a_10 + a_01*a_11, 0)
"""

from __future__ import annotations

import math
import operator
from fractions import Fraction

import numpy as np
import sympy as sp
import torch

_SUPPORTED = ("shape, ndim, dim(), item(), [] (ints, slices, Ellipsis, integer tensors), unsqueeze, flatten, "
              "unflatten, transpose, tril, +, -, *, @, torch.einsum, torch.cat")


def exact_constant(value: float) -> sp.Expr:
    """The exact number a float constant of the shipped code stands for.

    >>> exact_constant(3.0), exact_constant(0.25), exact_constant(math.sqrt(6))
    (3, 1/4, sqrt(6))
    """
    if not math.isfinite(value):
        raise ValueError(f"constant {value!r} is not finite; a symbolic proof needs exact constants.")
    if value == int(value):
        return sp.Integer(int(value))
    n = round(value * value)
    root = math.isqrt(n) if n > 0 else 0
    if n > 0 and root * root != n and math.sqrt(n) == abs(value):
        return sp.sqrt(n) if value > 0 else -sp.sqrt(n)
    frac = Fraction(value)
    if frac.denominator <= 2**20:
        return sp.Rational(frac.numerator, frac.denominator)
    raise ValueError(
        f"constant {value!r} from a real tensor has no exact form the proof recognises (an integer, a "
        "binary fraction with denominator <= 2^20, or sqrt of an integer); build it symbolically instead."
    )


def _as_array(x) -> np.ndarray:
    """The object array of a SymbolicTensor, a real tensor (exact constants) or a Python number."""
    if isinstance(x, SymbolicTensor):
        return x.data
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or not (x.is_floating_point() or x.dtype in _INT_DTYPES):
            raise TypeError(f"a real tensor of dtype {x.dtype} cannot enter a symbolic proof; use float or int.")
        values = [exact_constant(float(v)) for v in x.detach().double().reshape(-1).tolist()]
        return np.array(values, dtype=object).reshape(tuple(x.shape))
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return np.array(exact_constant(float(x)), dtype=object)
    if isinstance(x, sp.Expr):
        return np.array(x, dtype=object)
    raise TypeError(f"a {type(x).__name__} cannot enter a symbolic proof; use a SymbolicTensor, tensor or number.")


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _index(index):
    """An index with integer tensors turned into NumPy arrays (same meaning for these index kinds)."""
    if isinstance(index, tuple):
        return tuple(_index(i) for i in index)
    if isinstance(index, torch.Tensor):
        if index.dtype not in _INT_DTYPES:
            raise TypeError(f"a symbolic tensor takes integer index tensors only, got {index.dtype}.")
        return index.detach().cpu().numpy()
    if index is None or isinstance(index, (list, np.ndarray)) or isinstance(index, SymbolicTensor):
        raise TypeError(f"a symbolic tensor takes ints, slices, Ellipsis and integer tensors as index, "
                        f"got {type(index).__name__}.")
    return index


def _operator(op, swap: bool = False):
    """A binary operator method: ``self (op) other``, or ``other (op) self`` when ``swap``."""
    def method(self, other):
        return self._binary(other, op, swap)
    return method


class SymbolicTensor:
    """An array of SymPy expressions with the tensor interface of the efficient HLA forms.

    ``dtype`` is ``torch.float64`` and ``device`` the CPU, so that constants the shipped
    code builds ``like`` an input are real float64 tensors, read back exactly
    (:func:`exact_constant`).
    """

    __slots__ = ("data",)
    dtype = torch.float64
    device = torch.device("cpu")

    def __init__(self, data) -> None:
        data = np.asarray(data, dtype=object)
        self.data = data

    @classmethod
    def symbols(cls, name: str, shape: tuple[int, ...]) -> SymbolicTensor:
        """A tensor of fresh symbols ``{name}_{i}{j}...`` (real, as every input of the forms)."""
        out = np.empty(shape, dtype=object)
        for idx in np.ndindex(*shape):
            out[idx] = sp.Symbol(f"{name}_" + "".join(str(i) for i in idx), real=True)
        return cls(out)

    @classmethod
    def from_matrix(cls, matrix: sp.MatrixBase) -> SymbolicTensor:
        return cls(np.array(matrix.tolist(), dtype=object).reshape(matrix.shape))

    def to_matrix(self) -> sp.Matrix:
        if self.data.ndim != 2:
            raise ValueError(f"to_matrix needs a 2-d symbolic tensor, got shape {tuple(self.data.shape)}.")
        return sp.Matrix(self.data.tolist())

    # -- shape --------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    def dim(self) -> int:
        return self.data.ndim

    def item(self) -> sp.Expr:
        if self.data.size != 1:
            raise ValueError(f"item() needs one element, got shape {tuple(self.data.shape)}.")
        return self.data.reshape(()).item()

    def __getitem__(self, index) -> SymbolicTensor:
        return SymbolicTensor(self.data[_index(index)])

    def _dim(self, dim: int, extra: int = 0) -> int:
        n = self.data.ndim + extra
        if not -n <= dim < n:
            raise IndexError(f"dimension {dim} out of range for a {self.data.ndim}-d symbolic tensor.")
        return dim % n

    def unsqueeze(self, dim: int) -> SymbolicTensor:
        return SymbolicTensor(np.expand_dims(self.data, self._dim(dim, extra=1)))

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> SymbolicTensor:
        a, b = self._dim(start_dim), self._dim(end_dim)
        shape = self.data.shape
        return SymbolicTensor(self.data.reshape(shape[:a] + (-1,) + shape[b + 1:]))

    def unflatten(self, dim: int, sizes) -> SymbolicTensor:
        d = self._dim(dim)
        shape = self.data.shape
        return SymbolicTensor(self.data.reshape(shape[:d] + tuple(sizes) + shape[d + 1:]))

    def transpose(self, dim0: int, dim1: int) -> SymbolicTensor:
        return SymbolicTensor(np.swapaxes(self.data, self._dim(dim0), self._dim(dim1)))

    def tril(self, diagonal: int = 0) -> SymbolicTensor:
        if self.data.ndim < 2:
            raise ValueError("tril needs a symbolic tensor of at least 2 dims.")
        rows, cols = self.data.shape[-2:]
        keep = np.tri(rows, cols, k=diagonal, dtype=bool)
        return SymbolicTensor(np.where(keep, self.data, sp.Integer(0)))

    # -- arithmetic: elementwise with broadcasting, and @ --------------------------------
    def _binary(self, other, op, swap: bool = False) -> SymbolicTensor:
        a, b = self.data, _as_array(other)
        return SymbolicTensor(op(b, a) if swap else op(a, b))

    __add__, __radd__ = _operator(operator.add), _operator(operator.add, swap=True)
    __sub__, __rsub__ = _operator(operator.sub), _operator(operator.sub, swap=True)
    __mul__, __rmul__ = _operator(operator.mul), _operator(operator.mul, swap=True)
    __matmul__, __rmatmul__ = _operator(np.matmul), _operator(np.matmul, swap=True)

    def __neg__(self):
        return SymbolicTensor(-self.data)

    # -- refusals -----------------------------------------------------------------
    def __bool__(self):
        raise TypeError("the truth value of a symbolic tensor is undecided: a form under proof cannot branch "
                        "on its data.")

    def __array__(self, *args, **kwargs):
        raise TypeError("a symbolic tensor does not convert to a NumPy array; use .data.")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"SymbolicTensor has no {name!r}: a symbolic proof supports only {_SUPPORTED}; "
                             "add the operation to hla_analysis/symbolic/tensor.py with a test against torch.")

    def __repr__(self) -> str:
        return f"SymbolicTensor(shape={tuple(self.data.shape)})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _TORCH_FUNCTIONS.get(func)
        if handler is None:
            name = torch.overrides.resolve_name(func) or repr(func)
            raise TypeError(f"torch function {name} is not supported on a SymbolicTensor: a symbolic proof "
                            f"supports only {_SUPPORTED}; add it to hla_analysis/symbolic/tensor.py with a test "
                            "against torch.")
        return handler(*args, **kwargs)


def _einsum(equation: str, *operands) -> SymbolicTensor:
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    return SymbolicTensor(np.einsum(equation, *[_as_array(x) for x in operands]))


def _cat(tensors, dim: int = 0) -> SymbolicTensor:
    arrays = [_as_array(x) for x in tensors]
    if not arrays:
        raise ValueError("torch.cat needs at least one tensor.")
    return SymbolicTensor(np.concatenate(arrays, axis=SymbolicTensor(arrays[0])._dim(dim)))


def _real_left(op):
    """``real (op) symbolic`` as reached through ``Tensor.mul`` and friends."""
    def apply(left, right):
        return SymbolicTensor(op(_as_array(left), _as_array(right)))
    return apply


_TORCH_FUNCTIONS = {
    torch.einsum: _einsum,
    torch.cat: _cat,
    torch.Tensor.mul: _real_left(operator.mul),
    torch.Tensor.__mul__: _real_left(operator.mul),
    torch.Tensor.add: _real_left(operator.add),
    torch.Tensor.__add__: _real_left(operator.add),
    torch.Tensor.matmul: _real_left(np.matmul),
    torch.Tensor.__matmul__: _real_left(np.matmul),
}
