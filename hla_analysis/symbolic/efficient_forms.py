"""Symbolic proof that HLA's efficient forms equal the materialized map.

For small symbolic sizes every form is built in SymPy from its own recipe -- state sums
contracted one factor at a time, prefix-sum states (token by token), chunked states,
value modulation, and the tied symmetric-power state -- and its numerators and
denominators are expanded against the materialized ``prod_m (Q_m K_m^T)`` map.
An identity of polynomials in every entry of Q, K and V is a proof for those sizes.
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from math import factorial, prod

import sympy as sp

FORMS = ("contract", "recurrent", "chunked", "value_modulation", "tied")


def _matrices(n: int, r: int, factors: int, dv: int, tied: bool):
    qs = [sp.Matrix(n, r, lambda i, c, m=m: sp.Symbol(f"q{0 if tied else m}_{i}{c}")) for m in range(factors)]
    ks = [sp.Matrix(n, r, lambda j, c, m=m: sp.Symbol(f"k{0 if tied else m}_{j}{c}")) for m in range(factors)]
    v = sp.Matrix(n, dv, lambda j, e: sp.Symbol(f"v_{j}{e}"))
    return qs, ks, v


def materialized(qs, ks, v, causal: bool):
    """Numerators ``[N, dv]`` and denominators ``[N]`` of the materialized map."""
    n = v.shape[0]
    sims = [q * k.T for q, k in zip(qs, ks)]
    weights = sp.Matrix(n, n, lambda i, j: 0 if causal and j > i else prod(s[i, j] for s in sims))
    return weights * v, [sum(weights.row(i)) for i in range(n)]


def _key_state(ks, v, tokens):
    """``S[c1..cM, e] = sum_j prod_m K_m[j, c_m] V[j, e]`` and ``z`` (e = None) as dicts."""
    r = ks[0].shape[1]
    state = {}
    for idx in itertools.product(range(r), repeat=len(ks)):
        kprods = [prod(k[j, c] for k, c in zip(ks, idx)) for j in tokens]
        for e in range(v.shape[1]):
            state[idx + (e,)] = sum(kp * v[j, e] for kp, j in zip(kprods, tokens))
        state[idx + (None,)] = sum(kprods)
    return state


def _contract(state, qs, i, dv):
    """Contract the state with query ``i``, one factor (mode) at a time."""
    cur = state
    for q in qs:
        nxt = {}
        for key, val in cur.items():
            nxt[key[1:]] = nxt.get(key[1:], 0) + q[i, key[0]] * val
        cur = nxt
    return [cur[(e,)] for e in range(dv)], cur[(None,)]


def _rows(contracted, n: int, dv: int):
    """Stack per-query ``(row, denominator)`` pairs into ``num [N, dv]`` and ``den [N]``."""
    num = sp.zeros(n, dv)
    den = [0] * n
    for i, (row, d) in enumerate(contracted):
        num[i, :] = sp.Matrix([row])
        den[i] = d
    return num, den


def _form_contract(qs, ks, v, causal, chunk):
    if causal:
        raise ValueError("the contract form is non-causal; use recurrent or chunked for causal=True.")
    n, dv = v.shape
    state = _key_state(ks, v, range(n))
    return _rows((_contract(state, qs, i, dv) for i in range(n)), n, dv)


def _prefix_states(ks, v, n: int):
    """The state after each token: a prefix sum of per-token outer products."""
    state = {key: 0 for key in _key_state(ks, v, [])}
    for i in range(n):
        step = _key_state(ks, v, [i])
        state = {key: state[key] + step[key] for key in state}
        yield state


def _form_recurrent(qs, ks, v, causal, chunk):
    n, dv = v.shape
    states = _prefix_states(ks, v, n) if causal else itertools.repeat(_key_state(ks, v, range(n)), n)
    return _rows((_contract(state, qs, i, dv) for i, state in zip(range(n), states)), n, dv)


def _intra_chunk(qs, ks, v, i, block, causal, row, d):
    """Add the quadratic (masked) contributions of the keys inside query ``i``'s chunk."""
    for j in (j for j in block if not (causal and j > i)):
        w = prod(sum(q[i, c] * k[j, c] for c in range(q.shape[1])) for q, k in zip(qs, ks))
        row = [row[e] + w * v[j, e] for e in range(v.shape[1])]
        d += w
    return row, d


def _form_chunked(qs, ks, v, causal, chunk):
    n, dv = v.shape
    out = []
    carried = {key: 0 for key in _key_state(ks, v, [])}
    for start in range(0, n, chunk):
        block = range(start, min(start + chunk, n))
        inter = carried if causal else _key_state(ks, v, [j for j in range(n) if j not in block])
        out += [_intra_chunk(qs, ks, v, i, block, causal, *_contract(inter, qs, i, dv)) for i in block]
        step = _key_state(ks, v, list(block))
        carried = {key: carried[key] + step[key] for key in carried}
    return _rows(out, n, dv)


def _form_value_modulation(qs, ks, v, causal, chunk):
    # (S_1 o ... o S_M) V = sum_r diag(Q_M[:, r]) (S_1 o ... o S_{M-1}) diag(K_M[:, r]) V
    n, dv = v.shape
    inner = [q * k.T for q, k in zip(qs[:-1], ks[:-1])]
    a = sp.Matrix(n, n, lambda i, j: 0 if causal and j > i else prod(s[i, j] for s in inner))
    num, den = sp.zeros(n, dv), [0] * n
    for rr in range(qs[-1].shape[1]):
        dq, dk = sp.diag(*qs[-1][:, rr]), sp.diag(*ks[-1][:, rr])
        num += dq * a * dk * v
        dsum = dq * a * dk * sp.ones(n, 1)
        den = [den[i] + dsum[i] for i in range(n)]
    return num, den


def _multi_indices(factors: int, r: int):
    """``(alpha, M!/alpha!)`` for every multi-index of total degree M over r features."""
    for combo in itertools.combinations_with_replacement(range(r), factors):
        alpha = [combo.count(c) for c in range(r)]
        yield alpha, sp.Integer(factorial(factors)) / prod(factorial(a) for a in alpha)


def _tied_row(q, k, v, i, keys, factors):
    row, d = [0] * v.shape[1], 0
    for alpha, coef in _multi_indices(factors, q.shape[1]):
        qa = coef * prod(q[i, c] ** a for c, a in enumerate(alpha))
        kas = {j: prod(k[j, c] ** a for c, a in enumerate(alpha)) for j in keys}
        row = [row[e] + qa * sum(kas[j] * v[j, e] for j in keys) for e in range(v.shape[1])]
        d += qa * sum(kas.values())
    return row, d


def _form_tied(qs, ks, v, causal, chunk):
    # symmetric-power state: (q.k)^M = sum_{|alpha|=M} M!/alpha! q^alpha k^alpha
    n, dv = v.shape
    rows = (_tied_row(qs[0], ks[0], v, i, range(i + 1) if causal else range(n), len(qs)) for i in range(n))
    return _rows(rows, n, dv)


_FORMS = {
    "contract": _form_contract, "recurrent": _form_recurrent, "chunked": _form_chunked,
    "value_modulation": _form_value_modulation, "tied": _form_tied,
}


def efficient(form: str, qs, ks, v, causal: bool, chunk: int = 2):
    """Numerators and denominators of one efficient form (see :data:`FORMS`)."""
    if form not in _FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {FORMS}.")
    return _FORMS[form](qs, ks, v, causal, chunk)


@lru_cache(maxsize=64)
def prove_efficient_form(form: str, *, n: int = 3, r: int = 2, factors: int = 2, dv: int = 2,
                         causal: bool = False) -> bool:
    """True iff the form's numerators and denominators expand to the materialized ones.

    Parameters
    ----------
    form : str
        One of :data:`FORMS` (``contract`` is non-causal only; ``tied`` ties all factors).
    n, r, factors, dv : int
        Tokens, feature width per factor, ``M``, value width (keep them small: <= 4).
    causal : bool

    Raises
    ------
    ValueError
        Unknown form, sizes < 1, or sizes too large to expand quickly.

    Examples
    --------
    >>> prove_efficient_form("contract", factors=2)
    True
    >>> prove_efficient_form("recurrent", factors=2, causal=True)
    True
    """
    for name, value in (("n", n), ("r", r), ("factors", factors), ("dv", dv)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    if n * r**factors * dv > 400:
        raise ValueError(
            f"n * r^M * dv = {n * r**factors * dv} state entries is too large to expand quickly; keep it <= 400 "
            "(e.g. n=3, r=2, M<=3, dv<=2)."
        )
    qs, ks, v = _matrices(n, r, factors, dv, tied=form == "tied")
    num_ref, den_ref = materialized(qs, ks, v, causal)
    num, den = efficient(form, qs, ks, v, causal)
    return all(sp.expand(a - b) == 0 for a, b in zip(list(num), list(num_ref))) and all(
        sp.expand(a - b) == 0 for a, b in zip(den, den_ref)
    )
