"""Cost model as SymPy expressions: FLOPs and state memory per head, and the crossover N*.

Counts are multiply-adds x 2 for matrix products, per head, non-causal forward pass (the
Wan2.1 use case); lower-order elementwise terms (exp, division) are kept with unit cost.
Memory is the attention-specific state in elements: softmax's ``N^2`` map when
materialized (FlashAttention keeps ``O(N)`` row statistics instead, noted in the table);
linear attention and HLA keep their key state ``S`` and normalizer ``z``.
"""

from __future__ import annotations

from math import prod

import sympy as sp

N, d, dv, r, M = sp.symbols("N d d_v r M", positive=True, integer=True)


def softmax_cost():
    """``(flops, memory)``: ``Q K^T`` (2 N^2 d), exp + row sum + divide (3 N^2), ``A V`` (2 N^2 dv)."""
    return 2 * N**2 * d + 3 * N**2 + 2 * N**2 * dv, N**2


def hla_cost(widths=None, *, tied: bool = False):
    """``(flops, memory)`` of HLA with factor feature widths ``widths`` (default: M equal widths r).

    State ``P = prod r_m`` (``binomial(r+M-1, M)`` when tied: symmetric power). Per token:
    key Kronecker product built incrementally (``sum_m prod_{m'<=m} r_m'``), state update
    ``2 P (dv + 1)``, query contraction one factor at a time
    (``2 (dv + 1) sum_m P / prod_{m'<m} r_m'``), one division per output.

    Examples
    --------
    >>> flops, mem = hla_cost([r])   # kernel linear attention, width r
    >>> sp.expand(mem)
    d_v*r + r
    """
    if tied:
        width = r if widths is None else widths[0]
        factors = M if widths is None else len(widths)
        state = sp.binomial(width + factors - 1, factors)
        # monomials of k (and of q) are built once each: ~P products; contraction is one pass.
        per_token = 2 * state + 2 * state * (dv + 1) + 2 * state * (dv + 1) + dv
        return sp.expand_func(N * per_token), state * (dv + 1)
    if widths is None:
        m = sp.Symbol("m", integer=True, positive=True)
        state = r**M
        build = sp.Sum(r**m, (m, 2, M))
        contract = 2 * (dv + 1) * sp.Sum(r ** (M - m), (m, 0, M - 1))
    else:
        if not widths:
            raise ValueError("widths must list at least one factor width.")
        state = prod(widths)
        build = sum(prod(widths[: m + 1]) for m in range(1, len(widths)))
        contract = 2 * (dv + 1) * sum(state / prod(widths[:m]) for m in range(len(widths)))
    per_token = build + 2 * state * (dv + 1) + contract + dv
    return N * per_token, state * (dv + 1)


def crossover_tokens(widths=None, *, tied: bool = False) -> sp.Expr:
    """``N*`` solving ``flops_softmax(N) = flops_hla(N)``: HLA is cheaper for ``N > N*``.

    Examples
    --------
    >>> sp.simplify(crossover_tokens([r]))
    (4*d_v*r + d_v + 4*r)/(2*d + 2*d_v + 3)
    """
    f_soft, _ = softmax_cost()
    f_hla, _ = hla_cost(widths, tied=tied)
    sols = [x for x in sp.solve(sp.Eq(f_soft, f_hla.doit()), N) if x != 0]
    if len(sols) != 1:
        raise ValueError(f"expected one positive crossover, got {sols}.")
    return sols[0]


def evaluate_costs(*, n_tokens: int, head_dim: int, value_dim: int, widths, tied: bool = False) -> dict:
    """Numbers for one configuration: FLOPs of softmax and HLA per head, their ratio, N*, state."""
    subs = {N: n_tokens, d: head_dim, dv: value_dim}
    if tied:
        subs[r] = widths[0]
    f_soft, m_soft = softmax_cost()
    f_hla, m_hla = hla_cost(list(widths), tied=tied)
    n_star = crossover_tokens(list(widths), tied=tied)
    fs, fh = float(f_soft.subs(subs)), float(sp.sympify(f_hla).doit().subs(subs))
    return {
        "tokens": n_tokens, "factors": len(widths), "widths": "x".join(map(str, widths)), "tied": tied,
        "softmax_flops": fs, "hla_flops": fh, "flops_ratio_hla_over_softmax": fh / fs,
        "crossover_tokens": float(sp.sympify(n_star).subs(subs)),
        "softmax_map_elements": float(m_soft.subs(subs)),
        "hla_state_elements": float(sp.sympify(m_hla).subs(subs)),
    }
