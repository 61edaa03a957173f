"""Derive an attention weight's rational form in the score scale ``t`` from its definition.

What "scale every similarity by t" means here (one rule for every family): the query is
multiplied by ``t`` before its feature map, ``q -> t q``, i.e. ``t`` is an inverse
temperature on the logit ``s = scale * q.k``. Consequences, all derived below rather than
assumed:

* softmax: ``exp(t s_j) / sum_l exp(t s_l)`` -- not rational in ``t``;
* affine features ``[1, x/sqrt(M)]``: factor similarity ``1 + t s/M``, so HLA with ``M``
  tied factors is ``(1 + t s_j/M)^M / sum_l (1 + t s_l/M)^M``, degree ``M`` over ``M``
  (``M = 1`` is kernel linear attention, degree 1 over 1);
* Taylor (Based) features: ``1 + t s + t^2 s^2 / 2``, degree 2 per factor;
* homogeneous maps (identity, relu on a fixed sign pattern): the ``t`` cancels, the weight
  does not depend on ``t`` at all (degree 0) -- such attention cannot sharpen;
* exp, elu+1 (on negative components), FAVOR+: ``exp(t ...)`` terms survive the
  normalisation, so the weight is not rational in ``t``.

The weight is built for one query and ``n_keys`` keys; ``j = 1`` is the key whose weight is
reported. When the factor similarity is a function of the score alone (a dot-product
kernel, checked symbolically), the weight is written with score symbols ``s_l`` (one per
key, and per factor when factors are untied); otherwise with the query and key components.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import sympy as sp

from hla_analysis.symbolic.feature_maps import symbolic_feature_map

t = sp.Symbol("t", positive=True)

#: Largest total degree (factors x degree of one factor) expanded symbolically by default.
MAX_SYMBOLIC_DEGREE = 24
#: Largest number of factors for maps that are not dot-product kernels (expanded in components).
MAX_COMPONENT_FACTORS = 4

#: Largest number of untied factors (each brings its own score symbols).
MAX_UNTIED_FACTORS = 6

_KINDS = ("softmax", "linear", "hla", "power")


@dataclass(frozen=True)
class RationalForm:
    """The attention weight ``a_1(t)`` of one variant, as derived.

    ``numerator`` / ``denominator`` are the cancelled fraction (``None`` if not rational);
    ``formal_*_degree`` are the degrees before cancellation (e.g. identity features give
    ``t s_1 / (t s_1 + ...)``: formally 1 over 1, cancelled 0 over 0).
    """

    variant: str
    kind: str
    factors: int | None
    phi: str | None
    tied: bool
    rational: bool
    weight: sp.Expr
    factor_similarity: sp.Expr
    kernel: sp.Expr | None
    numerator: sp.Expr | None
    denominator: sp.Expr | None
    numerator_degree: int | None
    denominator_degree: int | None
    formal_numerator_degree: int | None
    formal_denominator_degree: int | None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def degree(self) -> int | None:
        """``max(numerator_degree, denominator_degree)``: the rational type; None if not rational."""
        if not self.rational:
            return None
        return max(self.numerator_degree, self.denominator_degree)

    def to_dict(self) -> dict:
        """JSON-ready dict; SymPy expressions become strings."""
        def s(x):
            return None if x is None else str(x)

        return {
            "variant": self.variant,
            "kind": self.kind,
            "factors": self.factors,
            "phi": self.phi,
            "tied": self.tied,
            "rational": self.rational,
            "numerator_degree": self.numerator_degree,
            "denominator_degree": self.denominator_degree,
            "formal_numerator_degree": self.formal_numerator_degree,
            "formal_denominator_degree": self.formal_denominator_degree,
            "numerator": s(self.numerator),
            "denominator": s(self.denominator),
            "factor_similarity": s(self.factor_similarity),
            "kernel": s(self.kernel),
            "weight": s(self.weight),
            "note": self.note,
            **self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def to_latex(self) -> str:
        """``a_1(t) = ...`` in LaTeX (the cancelled fraction when rational)."""
        if self.rational:
            return r"a_1(t) = \frac{%s}{%s}" % (sp.latex(self.numerator), sp.latex(self.denominator))
        return "a_1(t) = " + sp.latex(self.weight)


def _query_key_symbols(width: int, tag: str = ""):
    # A generic query has mixed signs: first component positive, the rest negative, so
    # piecewise maps (relu, elu+1) evaluate on a definite branch.
    q = [sp.Symbol(f"q{tag}_1", positive=True)] + [
        sp.Symbol(f"q{tag}_{c}", negative=True) for c in range(2, width + 1)
    ]
    return q


def _map_options(phi: str | None, options: dict | None, tag: str, key: str) -> tuple[dict, dict]:
    """Symbolic options for the query side and the key side of one factor."""
    options = dict(options or {})
    q_opts, k_opts = {}, {}
    if phi == "affine":
        q_opts["c"] = k_opts["c"] = options.get("c", 1)
    elif phi == "favor":
        # Two symbolic random directions already show whether exp terms survive; the
        # registry's feature count (often 64+) would only make the expression longer.
        q_opts["features"] = k_opts["features"] = min(int(options.get("features", 2)), 2)
    elif phi == "cosformer":
        q_opts["angle"] = sp.Symbol(f"theta_q{tag}", real=True)
        k_opts["angle"] = sp.Symbol(f"theta_{key}{tag}", real=True)
    return q_opts, k_opts


def factor_similarity(
    phi: str | None, *, options: dict | None = None, width: int = 2, tag: str = "", key: str = "k"
):
    """The factor similarity ``phi(t q) . phi(k)`` for symbolic ``q``, ``k`` of ``width``.

    ``phi=None`` means softmax's kernel ``exp(t q.k)``. ``options`` are the map options
    (``c`` for affine, ``features`` for favor).

    Returns
    -------
    (expr, q, k)

    Examples
    --------
    >>> f, q, k = factor_similarity("affine", options={"c": 3}, width=1)
    >>> sp.expand(f)
    k_1*q_1*t/3 + 1
    """
    q = _query_key_symbols(width, tag)
    k = [sp.Symbol(f"{key}{tag}_{c}", real=True) for c in range(1, width + 1)]
    tq = [t * qc for qc in q]
    if phi is None:
        return sp.exp(sum(a * b for a, b in zip(tq, k))), q, k
    q_opts, k_opts = _map_options(phi, options, tag, key)
    fq = symbolic_feature_map(phi, tq, **q_opts)
    fk = symbolic_feature_map(phi, k, **k_opts)
    return sp.expand(sum(a * b for a, b in zip(fq, fk))), q, k


def score_kernel(phi: str | None, *, options: dict | None = None, width: int = 2) -> sp.Lambda | None:
    """The scalar kernel ``kappa`` with ``phi(t q).phi(k) == kappa(t q.k)``, or None.

    The candidate is read off a one-dimensional slice and then verified on the full
    ``width``-dimensional vectors; maps that are not dot-product kernels return None.

    Examples
    --------
    >>> score_kernel("taylor")
    Lambda(u, u**2/2 + u + 1)
    >>> score_kernel("relu") is None
    True
    """
    f, q, k = factor_similarity(phi, options=options, width=width)
    u = sp.Symbol("u", real=True)
    slice_ = {t: 1, q[0]: u, k[0]: 1, **{c: 0 for c in q[1:] + k[1:]}}
    kappa = sp.expand(f.xreplace(slice_))
    if kappa.free_symbols - {u}:
        return None
    score = t * sum(a * b for a, b in zip(q, k))
    if sp.expand(f - kappa.xreplace({u: score}), power_exp=True) != 0:
        return None
    return sp.Lambda(u, kappa)


def _degree(expr: sp.Expr) -> int:
    return sp.Poly(expr, t).degree()


def _at_random_point(expr: sp.Expr, seed: int = 0) -> sp.Expr:
    """Replace every symbol but ``t`` by a random rational of the right sign."""
    import random

    rng = random.Random(seed)
    values = {}
    for sym in sorted(expr.free_symbols - {t}, key=str):
        value = sp.Rational(rng.randint(1, 9), rng.randint(2, 7))
        values[sym] = -value if sym.is_negative else value
    return expr.xreplace(values)


def _cancel_product(numer: sp.Expr, denom: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
    """Cancel ``numer / denom`` when ``numer`` is a product of known factors.

    Every common factor must divide the (product-form) numerator, so testing its
    irreducible factors one by one against the expanded denominator replaces a costly
    multivariate gcd by cheap exact divisions.
    """
    den = sp.expand(denom)
    coeff, factor_list = sp.factor_list(numer)
    num = sp.Integer(1)
    cancelled = False
    for g, mult in factor_list:
        for _ in range(mult):
            quotient, remainder = sp.div(den, g)
            if remainder == 0:
                den = sp.expand(quotient)
                cancelled = True
            else:
                num *= g
    if not cancelled:
        # Nothing cancelled: keep the readable product / sum-of-products form.
        return numer, denom
    return coeff * num, den


def derive_rational_form(kind: str, *, factors: int | None = None, phi: str | None = None, tied: bool = True,
                         n_keys: int = 3, options: dict | None = None, variant: str | None = None,
                         max_degree: int = MAX_SYMBOLIC_DEGREE) -> RationalForm:
    """Build ``a_1(t) = prod_m s^(m)_1(t) / sum_l prod_m s^(m)_l(t)`` and cancel it.

    Parameters
    ----------
    kind : {"softmax", "linear", "hla", "power"}
    factors : int, optional
        ``M`` (1 for linear, ``p`` for power); ignored for softmax.
    phi : str, optional
        Feature map name (see :func:`symbolic_feature_map`); ``power`` uses ``identity``.
    tied : bool
        All factors share q and k (the registry's HLA); False gives every factor its own.
    n_keys : int
        Number of keys in the row (3 is generic enough; >= 2).
    options : dict, optional
        Feature-map options as in the registry (``c`` for affine, ``features`` for favor).
    variant : str, optional
        Label stored in the result (default: built from the other arguments).
    max_degree : int
        Refuse expansions whose degree in ``t`` would exceed this.

    Returns
    -------
    RationalForm

    Raises
    ------
    ValueError
        Unknown kind, ``M < 1``, ``n_keys < 2``, or a degree beyond ``max_degree``.

    Examples
    --------
    >>> form = derive_rational_form("hla", factors=2, phi="affine", options={"c": 2})
    >>> form.numerator_degree, form.denominator_degree
    (2, 2)
    >>> sp.factor(form.numerator)
    (s_1*t + 2)**2/4
    >>> derive_rational_form("softmax").rational
    False
    """
    factors, phi = _checked_arguments(kind, factors, phi, n_keys)
    label = variant or (kind if kind == "softmax" else f"{kind}:m={factors},phi={phi}")
    kappa = score_kernel(phi, options=options)
    if kappa is not None:
        terms, sim = _kernel_terms(kappa, factors=factors, tied=tied, n_keys=n_keys, label=label,
                                   max_degree=max_degree)
    else:
        terms, sim = _component_terms(phi, options, factors=factors, tied=tied, n_keys=n_keys, label=label)
    numer0, denom0 = terms[0], sp.Add(*terms)
    weight = numer0 / denom0
    formal = numer0.is_polynomial(t) and denom0.is_polynomial(t)
    if formal:
        num, den = _cancel_product(numer0, denom0)
        rational, specialised = True, False
    else:
        rational, num, den = _rational_at_random_point(weight)
        specialised = True
    nd, dd = (_degree(num), _degree(den)) if rational else (None, None)
    if rational and nd == 0 and dd == 0:
        note = "homogeneous similarity: t cancels, the weight does not depend on the score scale"
    elif rational:
        note = f"rational of type ({nd}, {dd}) in t"
    else:
        note = "not rational in t: exp(t ...) terms survive the normalisation"
    if specialised:
        note += " (decided at a random point of the other symbols)"
    return RationalForm(
        variant=label, kind=kind, factors=None if kind == "softmax" else factors, phi=phi,
        tied=tied, rational=rational, weight=weight, factor_similarity=sim,
        kernel=None if kappa is None else kappa.expr,
        numerator=num, denominator=den, numerator_degree=nd, denominator_degree=dd,
        formal_numerator_degree=_degree(numer0) if formal else None,
        formal_denominator_degree=_degree(denom0) if formal else None,
        note=note,
    )


def _checked_arguments(kind: str, factors, phi, n_keys: int) -> tuple[int, str | None]:
    if kind not in _KINDS:
        raise ValueError(f"unknown variant kind {kind!r}; expected one of {_KINDS}.")
    if kind == "softmax":
        factors, phi = 1, None
    elif kind == "power":
        phi = phi or "identity"
    if factors is None:
        factors = 1
    if isinstance(factors, bool) or not isinstance(factors, int) or factors < 1:
        raise ValueError(f"the number of factors M must be an integer >= 1, got {factors!r}.")
    if kind == "linear" and factors != 1:
        raise ValueError(f"kernel linear attention has exactly one factor, got factors={factors}; use kind='hla'.")
    if n_keys < 2:
        raise ValueError(f"n_keys must be >= 2 (one key normalises to 1), got {n_keys}.")
    if kind != "softmax" and phi is None:
        raise ValueError(f"kind {kind!r} needs a feature map phi (e.g. 'affine').")
    return factors, phi


def _kernel_terms(kappa: sp.Lambda, *, factors: int, tied: bool, n_keys: int, label: str, max_degree: int):
    """Kernel path: the similarity is ``kappa(t s)``, so each key's term is written in score symbols."""
    expr = kappa.expr
    u = kappa.variables[0]
    per_factor = sp.Poly(expr, u).degree() if expr.is_polynomial(u) else 1
    if factors * per_factor > max_degree:
        raise ValueError(
            f"{label}: degree {factors * per_factor} in t is too large to expand quickly; use "
            f"M <= {max_degree // max(per_factor, 1)} symbolically (max_degree={max_degree}), or "
            "measure it numerically with `hla-analysis degree`."
        )
    if not tied and factors > MAX_UNTIED_FACTORS:
        raise ValueError(
            f"{label}: {factors} untied factors are too many to expand quickly; use "
            f"M <= {MAX_UNTIED_FACTORS} symbolically, or measure it numerically with `hla-analysis degree`."
        )
    n_sym = 1 if tied else factors
    s = [[sp.Symbol(f"s_{l}" if tied or n_sym == 1 else f"s{m + 1}_{l}", real=True) for m in range(n_sym)]
         for l in range(1, n_keys + 1)]
    terms = [sp.Mul(*[kappa(t * s[l][m if not tied else 0]) for m in range(factors)]) for l in range(n_keys)]
    return terms, kappa(t * sp.Symbol("s", real=True))


def _component_terms(phi: str, options, *, factors: int, tied: bool, n_keys: int, label: str):
    """Component path: maps that are no dot-product kernel are expanded feature by feature."""
    if factors > MAX_COMPONENT_FACTORS:
        raise ValueError(
            f"{label}: feature map {phi!r} is not a dot-product kernel, so it is expanded in "
            f"components; use M <= {MAX_COMPONENT_FACTORS} symbolically, or measure it "
            "numerically with `hla-analysis degree`."
        )
    n_sym = 1 if tied else factors
    sims = [[factor_similarity(phi, options=options, tag="" if tied else str(m + 1), key=f"k{l}")[0]
             for l in range(1, n_keys + 1)] for m in range(n_sym)]
    terms = [sp.Mul(*[sims[0 if tied else m][l] for m in range(factors)]) for l in range(n_keys)]
    return terms, factor_similarity(phi, options=options)[0]


def _rational_at_random_point(weight: sp.Expr):
    """``(rational, num, den)`` of a weight with non-polynomial similarities (exp, sqrt features).

    A symbolic cancel over all parameters is slow, and rationality in t is a generic
    property, so it is decided at a random parameter point (reported in the note).
    """
    point = sp.expand(_at_random_point(weight), power_exp=True, mul=False, multinomial=False)
    # exp atoms become symbols: constants get random positive values, exp(a t) a fresh
    # generator E_i; the weight is rational in t iff no E_i survives the cancellation.
    gens, values = {}, {}
    for i, atom in enumerate(sorted(point.atoms(sp.exp), key=str)):
        if atom.has(t):
            gens[atom] = sp.Symbol(f"E_{i}", positive=True)
        else:
            values[atom] = sp.Rational(i + 2, 3)
    reduced = sp.cancel(point.xreplace(values).xreplace(gens))
    rational = not reduced.has(*gens.values()) and bool(reduced.is_rational_function(t))
    num, den = sp.fraction(reduced) if rational else (None, None)
    return rational, num, den
