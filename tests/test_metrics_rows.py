"""Per-row metrics: hand-computed cases, then SciPy/NumPy on fresh random rows with masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from scipy.stats import entropy, rankdata, spearmanr

from hla_analysis.metrics import (
    average_ranks,
    entropy_rows,
    js_divergence_rows,
    kl_divergence_rows,
    spearman_rows,
    topk_recall_rows,
    total_variation_rows,
)

F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


# ------------------------------------------------------------------------------ hand cases


def test_hand_case_half_half_vs_quarter():
    p, q = t([[0.5, 0.5]]), t([[0.25, 0.75]])
    # KL = 1/2 ln(0.5/0.25) + 1/2 ln(0.5/0.75) = 1/2 ln(4/3) = 0.1438410362
    assert float(kl_divergence_rows(p, q)[0]) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    assert float(kl_divergence_rows(p, q)[0]) == pytest.approx(0.1438410362, abs=1e-10)
    # m = [3/8, 5/8]; KL(p||m) = 1/2 ln(4/3) + 1/2 ln(4/5) = 0.0322693;
    # KL(q||m) = 1/4 ln(2/3) + 3/4 ln(6/5) = 0.0353749; JS = mean = 0.0338221
    js = 0.5 * (0.5 * math.log(4 / 3) + 0.5 * math.log(4 / 5) + 0.25 * math.log(2 / 3) + 0.75 * math.log(6 / 5))
    assert float(js_divergence_rows(p, q)[0]) == pytest.approx(js, rel=1e-12)
    assert js == pytest.approx(0.0338221, abs=1e-7)
    # TV = 1/2 (0.25 + 0.25) = 0.25
    assert float(total_variation_rows(p, q)[0]) == pytest.approx(0.25, abs=1e-15)
    # H(p) = ln 2 = 0.693147; H(q) = 1/4 ln 4 + 3/4 ln(4/3) = 0.562335
    assert float(entropy_rows(p)[0]) == pytest.approx(math.log(2), rel=1e-12)
    assert float(entropy_rows(q)[0]) == pytest.approx(0.5623351446, abs=1e-10)


def test_kl_zero_approx_weight_is_inf_or_floored_and_flagged_never_nan():
    p, q = t([[0.5, 0.5], [0.5, 0.5]]), t([[0.0, 1.0], [0.5, 0.5]])
    kl, flag = kl_divergence_rows(p, q, return_floored=True)
    assert math.isinf(float(kl[0])) and float(kl[0]) > 0
    assert float(kl[1]) == 0.0
    assert flag.tolist() == [True, False]
    # floored: 1/2 ln(0.5/eps) + 1/2 ln(0.5/1) = 1/2 ln(0.25/eps)
    eps = 1e-8
    kl, flag = kl_divergence_rows(p, q, eps=eps, return_floored=True)
    assert float(kl[0]) == pytest.approx(0.5 * math.log(0.25 / eps), rel=1e-12)
    assert flag.tolist() == [True, False]
    # p = 0 where p_hat = 0 is fine: 0 log 0 = 0, no flag.
    kl, flag = kl_divergence_rows(t([[1.0, 0.0]]), t([[1.0, 0.0]]), return_floored=True)
    assert float(kl[0]) == 0.0 and not flag.any()
    with pytest.raises(ValueError, match="eps"):
        kl_divergence_rows(p, q, eps=0.0)


def test_topk_recall_hand_cases_with_ties_and_short_rows():
    # p's top 2 = {0, 1}; p_hat's top 2 = {1, 2} -> 1/2
    assert topk_recall_rows(t([[0.4, 0.3, 0.2, 0.1]]), t([[0.1, 0.3, 0.4, 0.2]]), k=2).tolist() == [0.5]
    # p tied at the threshold: {0,1,2} all count as top-2; p_hat picks 0 and one of {1,2} -> 1
    assert topk_recall_rows(t([[0.3, 0.3, 0.3, 0.1]]), t([[0.5, 0.2, 0.2, 0.1]]), k=2).tolist() == [1.0]
    # p_hat constant: a random 2 of 4 keys hits E = 2 * 2/4 = 1 of p's top 2 -> 1/2
    assert topk_recall_rows(t([[0.4, 0.3, 0.2, 0.1]]), t([[0.25] * 4]), k=2).tolist() == [0.5]
    # 3 allowed keys: k=2 compares within them; k=5 uses k_eff=3 (all allowed) -> 1
    allowed = torch.tensor([[True, True, True, False]])
    p, q = t([[0.5, 0.3, 0.2, 0.0]]), t([[0.1, 0.2, 0.3, 0.4]])
    # p top2 = {0,1}; p_hat's top 2 among allowed = {2,1} (key 3 is masked) -> 1/2
    assert topk_recall_rows(p, q, allowed=allowed, k=2).tolist() == [0.5]
    assert topk_recall_rows(p, q, allowed=allowed, k=5).tolist() == [1.0]
    # no allowed key at all: undefined
    none_allowed = torch.zeros(1, 2, dtype=torch.bool)
    assert math.isnan(float(topk_recall_rows(t([[0.0, 0.0]]), t([[0.5, 0.5]]), allowed=none_allowed)[0]))
    with pytest.raises(ValueError, match="k must"):
        topk_recall_rows(p, q, k=0)


def test_spearman_hand_case_with_ties_and_undefined_rows():
    # ranks(scores) = [0,1,2], ranks(p_hat) = [0.5,0.5,2]; centred: [-1,0,1], [-.5,-.5,1]
    # rho = 1.5 / sqrt(2 * 1.5) = sqrt(3)/2 = 0.8660254
    rho = spearman_rows(t([[1.0, 2.0, 3.0]]), t([[0.2, 0.2, 0.6]]))
    assert float(rho[0]) == pytest.approx(math.sqrt(3) / 2, rel=1e-12)
    # constant p_hat, or one allowed key: undefined (NaN, as scipy), not 0
    assert math.isnan(float(spearman_rows(t([[1.0, 2.0]]), t([[0.5, 0.5]]))[0]))
    one = torch.tensor([[True, False]])
    assert math.isnan(float(spearman_rows(t([[1.0, float("-inf")]]), t([[1.0, 0.0]]), allowed=one)[0]))
    with pytest.raises(ValueError, match="scores"):
        spearman_rows(t([[1.0, float("nan")]]), t([[0.5, 0.5]]))


def test_bad_inputs_raise():
    p = t([[0.5, 0.5]])
    with pytest.raises(ValueError, match="same"):
        kl_divergence_rows(p, t([[1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="negative"):
        total_variation_rows(p, t([[1.5, -0.5]]))
    with pytest.raises(ValueError, match="NaN"):
        js_divergence_rows(p, t([[float("nan"), 0.5]]))
    with pytest.raises(ValueError, match="sum to 1"):
        kl_divergence_rows(t([[2.0, 3.0]]), p)
    with pytest.raises(ValueError, match="outside"):
        kl_divergence_rows(p, p, allowed=torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="bool"):
        kl_divergence_rows(p, p, allowed=torch.ones(1, 2))
    with pytest.raises(ValueError, match="floating"):
        entropy_rows(torch.ones(1, 2, dtype=torch.long))


# --------------------------------------------------------- random rows vs SciPy / NumPy


def random_rows(rng: np.random.Generator, rows: int, n: int, *, ties: bool = False):
    """Softmax rows p and a different distribution p_hat under a causal + padding mask."""
    offset = n - rows
    i = np.arange(offset, n)[:, None]
    allowed = np.arange(n)[None, :] <= i
    pad = rng.random(n) < 0.2
    pad[0] = False
    allowed &= ~pad[None, :]
    scores = rng.normal(size=(rows, n)) * 2.0
    p = np.where(allowed, np.exp(scores - scores.max(1, keepdims=True)), 0.0)
    p /= p.sum(1, keepdims=True)
    w = np.where(allowed, np.maximum(1.0 + scores + rng.normal(size=(rows, n)), 0.05), 0.0)
    if ties:
        w = np.where(allowed, np.round(w, 0) + 0.05, 0.0)
    q = w / w.sum(1, keepdims=True)
    masked_scores = np.where(allowed, scores, -np.inf)
    return p, q, allowed, masked_scores


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_rows_match_scipy(seed, dtype, tol):
    rng = np.random.default_rng(seed)
    p, q, allowed, scores = random_rows(rng, rows=9, n=23, ties=seed == 2)
    P, Q, A, S = (torch.tensor(x, dtype=dtype) for x in (p, q, allowed, scores))
    A = A.bool()
    kl = kl_divergence_rows(P, Q, allowed=A).double().numpy()
    js = js_divergence_rows(P, Q, allowed=A).double().numpy()
    tv = total_variation_rows(P, Q, allowed=A).double().numpy()
    hp = entropy_rows(P, allowed=A).double().numpy()
    hq = entropy_rows(Q, allowed=A).double().numpy()
    rho = spearman_rows(S, Q, allowed=A).double().numpy()
    for r in range(p.shape[0]):
        a = allowed[r]
        pr, qr = p[r, a], q[r, a]
        assert kl[r] == pytest.approx(rel_entr(pr, qr).sum(), rel=tol, abs=tol)
        assert js[r] == pytest.approx(jensenshannon(pr, qr) ** 2, rel=tol, abs=tol)
        assert tv[r] == pytest.approx(0.5 * np.abs(pr - qr).sum(), rel=tol, abs=tol)
        assert hp[r] == pytest.approx(entropy(pr), rel=tol, abs=tol)
        assert hq[r] == pytest.approx(entropy(qr), rel=tol, abs=tol)
        if a.sum() >= 2:
            assert rho[r] == pytest.approx(spearmanr(scores[r, a], qr).statistic, rel=tol, abs=tol)


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("k", [1, 3, 5, 40])
def test_topk_recall_matches_set_intersection(seed, k):
    rng = np.random.default_rng(seed)
    p, q, allowed, _ = random_rows(rng, rows=12, n=30)  # continuous: no ties
    got = topk_recall_rows(torch.tensor(p), torch.tensor(q), allowed=torch.tensor(allowed), k=k).numpy()
    for r in range(p.shape[0]):
        idx = np.flatnonzero(allowed[r])
        k_eff = min(k, idx.size)
        top_p = set(idx[np.argsort(-p[r, idx])[:k_eff]])
        top_q = set(idx[np.argsort(-q[r, idx])[:k_eff]])
        assert got[r] == pytest.approx(len(top_p & top_q) / k_eff, abs=1e-12)


def test_average_ranks_match_rankdata_with_ties_and_mask():
    rng = np.random.default_rng(5)
    x = np.round(rng.normal(size=(6, 17)), 1)  # many ties
    allowed = rng.random((6, 17)) < 0.7
    ranks = average_ranks(torch.tensor(x), allowed=torch.tensor(allowed)).numpy()
    for r in range(6):
        a = allowed[r]
        np.testing.assert_allclose(ranks[r, a] + 1, rankdata(x[r, a], method="average"), atol=1e-12)


def test_entries_outside_allowed_are_ignored():
    rng = np.random.default_rng(6)
    p, q, allowed, scores = random_rows(rng, rows=7, n=15)
    P, Q, A, S = torch.tensor(p), torch.tensor(q), torch.tensor(allowed), torch.tensor(scores)
    junk = torch.tensor(rng.random(q.shape) * 5.0)
    Q2 = torch.where(A, Q, junk)  # approximation leaking weight onto masked keys
    S2 = torch.where(A, S, junk)
    for fn in (kl_divergence_rows, js_divergence_rows, total_variation_rows):
        torch.testing.assert_close(fn(P, Q2, allowed=A), fn(P, Q, allowed=A), rtol=0, atol=0)
    torch.testing.assert_close(entropy_rows(Q2, allowed=A), entropy_rows(Q, allowed=A), rtol=0, atol=0)
    torch.testing.assert_close(topk_recall_rows(P, Q2, allowed=A, k=3), topk_recall_rows(P, Q, allowed=A, k=3))
    torch.testing.assert_close(spearman_rows(S2, Q2, allowed=A), spearman_rows(S, Q, allowed=A), equal_nan=True)


def test_leading_dims_broadcast_mask():
    rng = np.random.default_rng(7)
    p, q, allowed, _ = random_rows(rng, rows=5, n=9)
    P = torch.tensor(np.stack([p, p]))  # [2 heads, R, N]
    Q = torch.tensor(np.stack([q, p]))
    kl = kl_divergence_rows(P, Q, allowed=torch.tensor(allowed))  # mask [R, N] broadcasts
    assert kl.shape == (2, 5)
    torch.testing.assert_close(kl[0], kl_divergence_rows(P[0], Q[0], allowed=torch.tensor(allowed)))
    assert torch.all(kl[1] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_order_key_sorts_and_ties_like_the_floats(dtype):
    """Issue 12: sorts and top-k run on integer keys. On fresh random values with repeats,
    both zeros, infinities and subnormals, the keys give the floats' order and ties exactly."""
    from hla_analysis.metrics.rows import order_key

    g = torch.Generator().manual_seed(12)
    x = torch.randn(6, 50, generator=g, dtype=dtype) * torch.logspace(-40, 3, 50, dtype=dtype)
    x[:, 20:30] = x[:, 10:20]  # repeated values
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), torch.finfo(dtype).tiny / 4], dtype=dtype)
    x[:, -5:] = special
    key = order_key(x)
    assert not key.is_floating_point()
    i, j = torch.meshgrid(torch.arange(50), torch.arange(50), indexing="ij")
    assert torch.equal(key[:, i] < key[:, j], x[:, i] < x[:, j])
    assert torch.equal(key[:, i] == key[:, j], x[:, i] == x[:, j])  # -0.0 ties with +0.0


def test_average_ranks_tie_both_zeros():
    assert average_ranks(torch.tensor([0.0, -0.0, 1.0, -1.0])).tolist() == [1.5, 1.5, 3.0, 0.0]
