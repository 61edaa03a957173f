"""Symbolic proof that the shipped efficient HLA forms equal the materialized map.

The forms of :mod:`hla_analysis.ops.hla` (``_contract``, ``_recurrent``, ``_chunked``,
``_value_modulation`` and ``_tied`` with ``symmetric_power_features``) run unchanged on a
:class:`~hla_analysis.symbolic.tensor.SymbolicTensor` of symbols for every entry of Q, K
and V. Their numerators and denominators are expanded against the materialized
``prod_m (Q_m K_m^T)`` map, built here in plain SymPy. An identity of polynomials in every
entry is a proof for those sizes, of the code that runs, not of a copy of it.
"""

from __future__ import annotations

import importlib
from math import prod

import numpy as np
import sympy as sp

from hla_analysis.symbolic.tensor import SymbolicTensor

FORMS = ("contract", "recurrent", "chunked", "value_modulation", "tied")
# forms that continue from the state of earlier keys (``initial_state``)
STATEFUL_FORMS = ("recurrent", "chunked")
MAX_STATE_ENTRIES = 400


def _widths(r, factors: int) -> tuple[int, ...]:
    widths = (r,) * factors if isinstance(r, int) else tuple(r)
    if len(widths) != factors or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"r must be an integer >= 1 or one such width per factor ({factors}), got {r!r}.")
    return widths


def _matrices(n: int, r, factors: int, dv: int, tied: bool, *, prior: int = 0):
    """Symbolic ``qs`` (n rows), ``ks`` and ``v`` (``prior + n`` rows: the earlier keys first)."""
    widths = _widths(r, factors)
    if tied and len(set(widths)) > 1:
        raise ValueError(f"tied factors share one width, got {widths}.")
    qs = [sp.Matrix(n, w, lambda i, c, m=m: sp.Symbol(f"q{0 if tied else m}_{i}{c}")) for m, w in enumerate(widths)]
    ks = [sp.Matrix(prior + n, w, lambda j, c, m=m: sp.Symbol(f"k{0 if tied else m}_{j}{c}"))
          for m, w in enumerate(widths)]
    v = sp.Matrix(prior + n, dv, lambda j, e: sp.Symbol(f"v_{j}{e}"))
    return qs, ks, v


def materialized(qs, ks, v, causal: bool, *, prior: int = 0):
    """Numerators ``[Nq, dv]`` and denominators ``[Nq]`` of the materialized map.

    Query ``i`` sits at position ``prior + i`` among the keys (causal: it sees keys ``<=``).
    """
    n, n_keys = qs[0].shape[0], v.shape[0]
    sims = [q * k.T for q, k in zip(qs, ks)]
    weights = sp.Matrix(n, n_keys, lambda i, j: 0 if causal and j > prior + i else prod(s[i, j] for s in sims))
    return weights * v, [sum(weights.row(i)) for i in range(n)]


def _with_ones(v: sp.Matrix) -> SymbolicTensor:
    """``[v, 1]``: the values with the normaliser column, as :func:`hla_analysis.ops.hla` builds them."""
    return SymbolicTensor.from_matrix(v.row_join(sp.ones(v.shape[0], 1)))


def _key_state(ks, v) -> SymbolicTensor:
    """``sum_j k1_j (x) ... (x) kM_j (x) [v_j, 1]`` in the ``initial_state`` layout ``[r_1, r_2*...*r_M*e]``.

    Written from the definition (outer products, row-major flattening), not with the shipped helpers.
    """
    values = _with_ones(v).data
    state = 0
    for j in range(v.shape[0]):
        outer = np.array(1, dtype=object)
        for k in ks:
            outer = np.multiply.outer(outer, np.array(list(k.row(j)), dtype=object))
        state = state + np.multiply.outer(outer, values[j])
    return SymbolicTensor(np.asarray(state, dtype=object).reshape(ks[0].shape[1], -1))


def efficient(form: str, qs, ks, v, causal: bool, chunk: int = 2, *, prior: int = 0):
    """Numerators ``[Nq, dv]`` and denominators ``[Nq]`` of the shipped form ``form``, run on symbols.

    ``qs``, ``ks``, ``v`` are SymPy matrices; the first ``prior`` rows of ``ks`` and ``v`` are
    earlier keys, handed to the form as its ``initial_state`` (forms in :data:`STATEFUL_FORMS`).
    ``chunk`` is the chunk or block size. ``chunked`` without ``causal`` runs ``_contract``,
    as :func:`hla_analysis.ops.hla` does; ``tied`` uses ``qs[0]``, ``ks[0]`` and ``len(qs)``.
    """
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {FORMS}.")
    if prior and (form not in STATEFUL_FORMS or (form == "chunked" and not causal)):
        raise ValueError(f"form {form!r} (causal={causal}) takes no initial state; prior keys need recurrent, "
                         "or chunked with causal=True.")
    if form == "contract" and causal:
        raise ValueError("the contract form is non-causal; use recurrent or chunked for causal=True.")
    shipped = importlib.import_module("hla_analysis.ops.hla")  # the module (the package re-exports a function hla)
    initial = _key_state([k[:prior, :] for k in ks], v[:prior, :]) if prior else None
    sq = [SymbolicTensor.from_matrix(q) for q in qs]
    sk = [SymbolicTensor.from_matrix(k[prior:, :]) for k in ks]
    values = _with_ones(v[prior:, :])
    runs = {  # each form called as hla() calls it; hla(form="chunked") runs _contract when not causal
        "contract": lambda: shipped._contract(sq, sk, values, block=chunk),
        "recurrent": lambda: shipped._recurrent(sq, sk, values, causal=causal, initial_state=initial),
        "chunked": lambda: (shipped._chunked(sq, sk, values, chunk=chunk, initial_state=initial) if causal
                            else shipped._contract(sq, sk, values, block=chunk)),
        "value_modulation": lambda: shipped._value_modulation(sq, sk, values, causal=causal, chunk=chunk),
        "tied": lambda: shipped._tied(sq[0], sk[0], len(qs), values, causal=causal, chunk=chunk, block=chunk),
    }
    out = runs[form]().to_matrix()
    return out[:, :-1], list(out[:, -1])


def _check_sizes(n, r, factors, dv, chunk, prior) -> tuple[int, ...]:
    for name, value in (("n", n), ("factors", factors), ("dv", dv), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    if isinstance(prior, bool) or not isinstance(prior, int) or prior < 0:
        raise ValueError(f"prior must be an integer >= 0, got {prior!r}.")
    widths = _widths(r, factors)
    entries = (n + prior) * prod(widths) * dv
    if entries > MAX_STATE_ENTRIES:
        raise ValueError(
            f"(n + prior) * r_1*...*r_M * dv = {entries} state entries is too large to expand quickly; keep it "
            f"<= {MAX_STATE_ENTRIES} (e.g. n=3, r=2, M<=3, dv<=2)."
        )
    return widths


def prove_efficient_form(form: str, *, n: int = 3, r: int | tuple[int, ...] = 2, factors: int = 2, dv: int = 2,
                         causal: bool = False, chunk: int = 2, prior: int = 0) -> bool:
    """True iff the shipped form's numerators and denominators expand to the materialized ones.

    Parameters
    ----------
    form : str
        One of :data:`FORMS` (``contract`` is non-causal only; ``tied`` ties all factors).
    n, factors, dv : int
        Tokens, ``M``, value width (keep them small: <= 5).
    r : int or tuple of int
        Feature width of every factor, or one width per factor.
    causal : bool
    chunk : int
        Chunk (causal) or block (non-causal) size; one that does not divide ``n`` leaves a
        short last chunk.
    prior : int
        Earlier keys carried in as ``initial_state`` (forms in :data:`STATEFUL_FORMS`).

    Raises
    ------
    ValueError
        Unknown form, sizes < 1, an initial state the form does not take, or sizes too large
        to expand quickly.

    Examples
    --------
    >>> prove_efficient_form("contract", factors=2)
    True
    >>> prove_efficient_form("chunked", n=4, factors=2, dv=1, causal=True, chunk=3, prior=2)
    True
    """
    _check_sizes(n, r, factors, dv, chunk, prior)
    qs, ks, v = _matrices(n, r, factors, dv, tied=form == "tied", prior=prior)
    num_ref, den_ref = materialized(qs, ks, v, causal, prior=prior)
    num, den = efficient(form, qs, ks, v, causal, chunk, prior=prior)
    return all(sp.expand(a - b) == 0 for a, b in zip([*num, *den], [*num_ref, *den_ref], strict=True))
