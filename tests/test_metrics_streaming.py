"""Whole-head metrics: hand case, NumPy full-matrix reference, streaming == one block, masks,
failed rows excluded and counted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from scipy.stats import entropy, spearmanr

from hla_analysis.metrics import KL_EPS, StreamingAttentionMetrics, head_metrics, stream_head_metrics


def test_hand_case_two_rows():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64)
    v = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    m = head_metrics(p, q, v=v, k=1)
    # ||P - Q||^2 = 2 * 0.25^2 + 2 * 0.5^2 = 0.625, ||P||^2 = 0.5 + 1 = 1.5 -> sqrt(5/12)
    assert m["frobenius_rel"] == pytest.approx(math.sqrt(0.625 / 1.5), rel=1e-12)
    # PV = [2, 1], QV = [2.5, 2]: ||diff||^2 = 0.25 + 1 = 1.25, ||PV||^2 = 5 -> 0.5
    assert m["output_rel"] == pytest.approx(0.5, rel=1e-12)
    # KL rows: 1/2 ln(4/3) and 1 * ln(1/0.5) = ln 2
    assert m["kl_mean"] == pytest.approx(0.5 * (0.5 * math.log(4 / 3) + math.log(2)), rel=1e-12)
    assert m["kl_max"] == pytest.approx(math.log(2), rel=1e-12)
    # TV rows 0.25 and 0.5
    assert m["tv_mean"] == pytest.approx(0.375, rel=1e-12)
    # entropies: p rows ln2 and 0; q rows H(1/4,3/4) = 0.562335 and ln 2
    assert m["entropy_ref_mean"] == pytest.approx(math.log(2) / 2, rel=1e-12)
    assert m["entropy_approx_mean"] == pytest.approx((0.5623351446 + math.log(2)) / 2, abs=1e-10)
    # top-1: row 0 p tied -> both count, q picks key 1 -> 1; row 1 q tied, half credit -> 0.5
    assert m["topk_recall_mean"] == pytest.approx(0.75, abs=1e-15)
    assert (m["rows"], m["counted_rows"], m["failed_rows"], m["failed_fraction"]) == (2, 2, 0, 0.0)
    assert "spearman_mean" not in m  # not computed without scores: absent, not NaN


# ------------------------------------------------------------- full-matrix NumPy reference


def make_head(seed: int, n: int, *, causal: bool, pad: bool, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    d = 8
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    k = torch.randn(n, d, generator=g, dtype=torch.float64)
    v = torch.randn(n, 3, generator=g, dtype=torch.float64)
    kpm = torch.ones(n, dtype=torch.bool)
    if pad:
        kpm[-(n // 4):] = False  # right padding, as BERT tokenizers do
    allowed = kpm[None, :].expand(n, n).clone()
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    scores = (q @ k.T / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, -1)
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1  # linear attention
    w = (fq @ fk.T) * allowed
    p_hat = w / w.sum(-1, keepdim=True)
    cast = lambda x: x.to(dtype)  # noqa: E731
    return cast(p), cast(p_hat), allowed, cast(scores), cast(v), (kpm if pad else None)


def numpy_reference(p, q, allowed, v, scores, counted, k, eps):
    p, q, allowed, v, scores = (np.asarray(x, dtype=np.float64) for x in (p, q, allowed, v, scores))
    allowed = allowed.astype(bool)
    rows = np.flatnonzero(counted)
    kl, js, tv, hp, hq, rec, rho = [], [], [], [], [], [], []
    floored = 0
    for r in rows:
        a = allowed[r]
        pr, qr = p[r, a], q[r, a]
        floored += bool(np.any((pr > 0) & (qr < eps)))
        kl.append(rel_entr(pr, np.maximum(qr, eps)).sum())
        js.append(jensenshannon(pr, qr) ** 2)
        tv.append(0.5 * np.abs(pr - qr).sum())
        hp.append(entropy(pr))
        hq.append(entropy(qr))
        ke = min(k, a.sum())
        rec.append(len(set(np.argsort(-pr)[:ke]) & set(np.argsort(-qr)[:ke])) / ke)
        if a.sum() >= 2:
            rho.append(spearmanr(scores[r, a], qr).statistic)
    P, Q = np.where(allowed, p, 0)[rows], np.where(allowed, q, 0)[rows]
    return {
        "kl_mean": np.mean(kl), "kl_max": np.max(kl), "js_mean": np.mean(js), "tv_mean": np.mean(tv),
        "entropy_ref_mean": np.mean(hp), "entropy_approx_mean": np.mean(hq), "topk_recall_mean": np.mean(rec),
        "spearman_mean": np.mean(rho), "spearman_rows": len(rho), "kl_floored_rows": floored,
        "frobenius_rel": np.linalg.norm(P - Q) / np.linalg.norm(P),
        "output_rel": np.linalg.norm(P @ v - Q @ v) / np.linalg.norm(P @ v),
        "counted_rows": len(rows),
    }


@pytest.mark.parametrize("causal,pad", [(False, False), (True, False), (False, True), (True, True)])
def test_head_metrics_match_numpy_full_matrix(causal, pad):
    p, q, allowed, scores, v, _ = make_head(10 + 2 * causal + pad, 29, causal=causal, pad=pad)
    got = head_metrics(p, q, allowed=allowed, v=v, scores=scores, k=4)
    want = numpy_reference(p, q, allowed, v, scores, np.ones(29, bool), 4, KL_EPS)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key


@pytest.mark.parametrize("block_rows", [1, 4, 7, 16, 29, 100])
@pytest.mark.parametrize("causal,pad", [(True, True), (False, True)])
def test_streaming_equals_one_block(block_rows, causal, pad):
    n = 29
    p, q, allowed, scores, v, kpm = make_head(20, n, causal=causal, pad=pad)
    full = head_metrics(p, q, allowed=allowed, v=v, scores=scores)
    streamed = stream_head_metrics(
        lambda rows: p[rows], lambda rows: q[rows], n_queries=n, v=v, block_rows=block_rows,
        scores_rows=lambda rows: scores[rows], causal=causal, key_padding_mask=kpm,
    )
    assert streamed.keys() == full.keys()
    for key in full:
        assert streamed[key] == pytest.approx(full[key], rel=1e-12, abs=1e-14), key


def test_float32_close_to_float64():
    p, q, allowed, scores, v, kpm = make_head(30, 40, causal=True, pad=True)
    p32, q32, s32, v32 = (x.float() for x in (p, q, scores, v))
    m64 = stream_head_metrics(lambda r: p[r], lambda r: q[r], n_queries=40, v=v, block_rows=9,
                              scores_rows=lambda r: scores[r], causal=True, key_padding_mask=kpm)
    m32 = stream_head_metrics(lambda r: p32[r], lambda r: q32[r], n_queries=40, v=v32, block_rows=9,
                              scores_rows=lambda r: s32[r], causal=True, key_padding_mask=kpm)
    for key in m64:
        assert m32[key] == pytest.approx(m64[key], rel=1e-4, abs=1e-6), key


def test_mask_is_respected_and_mismatch_is_refused():
    p, q, allowed, scores, v, kpm = make_head(40, 20, causal=True, pad=True)
    junk = torch.rand(20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaky = torch.where(allowed, q, junk)  # weight on masked keys must be ignored
    a = stream_head_metrics(lambda r: p[r], lambda r: q[r], n_queries=20, v=v, block_rows=6,
                            causal=True, key_padding_mask=kpm)
    b = stream_head_metrics(lambda r: p[r], lambda r: leaky[r], n_queries=20, v=v, block_rows=6,
                            allowed_rows=lambda r: allowed[r])
    assert a == b
    # A non-causal reference under a causal mask is a caller bug: refused, not averaged.
    p_full, *_ = make_head(40, 20, causal=False, pad=False)
    with pytest.raises(ValueError, match="outside"):
        stream_head_metrics(lambda r: p_full[r], lambda r: p_full[r], n_queries=20, causal=True)
    with pytest.raises(ValueError, match="not both"):
        stream_head_metrics(lambda r: p[r], lambda r: q[r], n_queries=20, causal=True,
                            allowed_rows=lambda r: allowed[r])


def test_failed_rows_excluded_and_counted():
    n = 24
    p, q, allowed, scores, v, kpm = make_head(50, n, causal=True, pad=False)
    invalid = torch.zeros(n, dtype=torch.bool)
    invalid[[3, 10]] = True  # e.g. non-positive normalizer reported by the variant
    broken = q.clone()
    broken[5, 0] = float("nan")  # overflow
    broken[17, :2] = torch.tensor([-0.25, 1.25], dtype=torch.float64)  # negative weight
    broken[10] = float("inf")  # also flagged by the caller: counted once
    got = stream_head_metrics(lambda r: p[r], lambda r: broken[r], n_queries=n, v=v, block_rows=5,
                              scores_rows=lambda r: scores[r], causal=True, invalid=invalid)
    keep = np.ones(n, bool)
    keep[[3, 5, 10, 17]] = False
    want = numpy_reference(p, q, allowed, v, scores, keep, 5, KL_EPS)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key
    assert (got["failed_rows"], got["invalid_rows"], got["nonfinite_rows"], got["negative_rows"]) == (4, 2, 2, 1)
    assert got["failed_fraction"] == pytest.approx(4 / n)
    assert all(not math.isnan(x) for x in got.values())

    # The same failures signalled per block by approx_rows itself.
    def approx(rows):
        return broken[rows], invalid[rows]

    assert stream_head_metrics(lambda r: p[r], approx, n_queries=n, v=v, block_rows=7,
                               scores_rows=lambda r: scores[r], causal=True) == pytest.approx(got)


def test_all_rows_failed_gives_nan_averages_and_full_failure_count():
    p = torch.full((3, 4), 0.25, dtype=torch.float64)
    m = head_metrics(p, torch.full_like(p, float("nan")), v=torch.ones(4, 2, dtype=torch.float64))
    assert m["failed_fraction"] == 1.0 and m["counted_rows"] == 0
    assert math.isnan(m["kl_mean"]) and math.isnan(m["output_rel"])


def test_floored_kl_rows_counted():
    p = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    m = head_metrics(p, q, eps=1e-8)
    assert m["kl_floored_rows"] == 1
    # row 0: 1/2 ln(0.5/1e-8) + 1/2 ln(0.5) = 1/2 ln(0.25e8); row 1: 0
    assert m["kl_max"] == pytest.approx(0.5 * math.log(0.25e8), rel=1e-12)
    assert m["kl_mean"] == pytest.approx(0.25 * math.log(0.25e8), rel=1e-12)


def test_query_mask_leaves_rows_out_entirely():
    p, q, allowed, scores, v, kpm = make_head(60, 16, causal=False, pad=True)
    m = stream_head_metrics(lambda r: p[r], lambda r: q[r], n_queries=16, v=v, block_rows=5,
                            key_padding_mask=kpm, query_mask=kpm)
    want = head_metrics(p[kpm], q[kpm], allowed=allowed[kpm], v=v)
    assert m["rows"] == int(kpm.sum())
    assert m == pytest.approx(want, rel=1e-12)


def test_bad_streaming_input():
    p = torch.full((4, 4), 0.25)
    with pytest.raises(ValueError, match="block_rows"):
        stream_head_metrics(lambda r: p[r], lambda r: p[r], n_queries=4, block_rows=0)
    with pytest.raises(ValueError, match="must return"):
        stream_head_metrics(lambda r: p, lambda r: p[r], n_queries=4, block_rows=2)
    with pytest.raises(ValueError, match="invalid"):
        stream_head_metrics(lambda r: p[r], lambda r: p[r], n_queries=4, invalid=torch.zeros(3, dtype=torch.bool))
    acc = StreamingAttentionMetrics()
    acc.update(p[:2], p[:2], v=torch.ones(4, 1))
    with pytest.raises(ValueError, match="every block"):
        acc.update(p[2:], p[2:])
    with pytest.raises(ValueError, match="no rows"):
        StreamingAttentionMetrics().compute()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    p, q, allowed, scores, v, kpm = make_head(70, 300, causal=True, pad=True)
    cpu = stream_head_metrics(lambda r: p[r], lambda r: q[r], n_queries=300, v=v, block_rows=64,
                              scores_rows=lambda r: scores[r], causal=True, key_padding_mask=kpm)
    pc, qc, sc, vc, kc = (x.cuda() for x in (p, q, scores, v, kpm))
    gpu = stream_head_metrics(lambda r: pc[r], lambda r: qc[r], n_queries=300, v=vc, block_rows=64,
                              scores_rows=lambda r: sc[r], causal=True, key_padding_mask=kc)
    assert gpu == pytest.approx(cpu, rel=1e-9, abs=1e-12)


def test_half_precision_rows_are_computed_in_float32():
    p, q, allowed, scores, v, kpm = make_head(80, 32, causal=True, pad=False)
    m64 = head_metrics(p, q, allowed=allowed, v=v, scores=scores)
    m16 = head_metrics(p.half(), q.half(), allowed=allowed, v=v.half(), scores=scores.half())
    for key in ("kl_mean", "js_mean", "tv_mean", "entropy_ref_mean", "frobenius_rel", "output_rel"):
        assert m16[key] == pytest.approx(m64[key], rel=2e-2, abs=2e-3), key
    assert m16["counted_rows"] == 32 and m16["kl_floored_rows"] == 0


def test_refused_block_leaves_no_trace():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64)
    v = torch.ones(2, 1, dtype=torch.float64)
    acc = StreamingAttentionMetrics()
    acc.update(p[:1], q[:1], v=v)
    with pytest.raises(ValueError, match="v must be"):
        acc.update(p[1:], q[1:], v=torch.ones(3, 1, dtype=torch.float64))
    acc.update(p[1:], q[1:], v=v)
    assert acc.compute() == head_metrics(p, q, v=v)


def test_batch_dims_equal_separate_accumulators():
    """batch_dims=1 gives, per leading index, exactly what a separate accumulator gives."""
    g = torch.Generator().manual_seed(21)
    heads, n = 3, 9
    p = torch.softmax(torch.randn(heads, n, n, generator=g, dtype=torch.float64), -1)
    p_hat = torch.softmax(torch.randn(heads, n, n, generator=g, dtype=torch.float64), -1)
    scores = torch.randn(heads, n, n, generator=g, dtype=torch.float64)
    v = torch.randn(heads, n, 4, generator=g, dtype=torch.float64)
    invalid = torch.zeros(heads, n, dtype=torch.bool)
    invalid[1, 2] = True
    batched = StreamingAttentionMetrics(batch_dims=1)
    for rows in (slice(0, 4), slice(4, n)):
        batched.update(p[:, rows], p_hat[:, rows], v=v, scores=scores[:, rows], invalid=invalid[:, rows])
    got = batched.compute()
    for h in range(heads):
        single = StreamingAttentionMetrics()
        single.update(p[h], p_hat[h], v=v[h], scores=scores[h], invalid=invalid[h])
        for name, value in single.compute().items():
            assert float(got[name][h]) == pytest.approx(value, rel=1e-12, abs=1e-15, nan_ok=True), name


def test_rank_stride_samples_rows_for_spearman_only():
    g = torch.Generator().manual_seed(22)
    p = torch.softmax(torch.randn(12, 10, generator=g, dtype=torch.float64), -1)
    p_hat = torch.softmax(torch.randn(12, 10, generator=g, dtype=torch.float64), -1)
    scores = torch.randn(12, 10, generator=g, dtype=torch.float64)
    strided = StreamingAttentionMetrics(rank_stride=3)
    strided.update(p, p_hat, scores=scores)
    sampled = StreamingAttentionMetrics()
    sampled.update(p[::3], p_hat[::3], scores=scores[::3])
    full = StreamingAttentionMetrics()
    full.update(p, p_hat, scores=scores)
    got, want_rank, want_rest = strided.compute(), sampled.compute(), full.compute()
    assert got["spearman_rows"] == 4 and got["spearman_mean"] == pytest.approx(want_rank["spearman_mean"], rel=1e-12)
    assert got["kl_mean"] == pytest.approx(want_rest["kl_mean"], rel=1e-12)
    with pytest.raises(ValueError, match="rank_stride"):
        StreamingAttentionMetrics(rank_stride=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_recall_on_integer_keys_equals_the_plain_rows_with_signed_zeros(dtype):
    """Issue 12: the streaming top-k picks on the weights' bits. Rows whose k-th weight is a
    zero, with -0.0 and +0.0 mixed at the cut, must still be scored as ties (the plain
    per-row function, on float comparisons, is the reference); fresh random rows."""
    from hla_analysis.metrics import topk_recall_rows

    g = torch.Generator().manual_seed(21)
    r, n, k = 40, 12, 4
    p = torch.softmax(torch.randn(r, n, generator=g, dtype=dtype) * 2, -1)
    q = torch.relu(torch.randn(r, n, generator=g, dtype=dtype))
    q[:, : n // 2] = torch.where(q[:, : n // 2] == 0, torch.tensor(-0.0, dtype=dtype), q[:, : n // 2])
    q[::3, 2:] = 0.0  # many rows: at most 2 positive weights, the rest of the top-k tied zeros
    q[1::3, 2:] = -0.0
    assert (torch.signbit(q) & (q == 0)).any() and ((q == 0) & ~torch.signbit(q)).any()
    acc = StreamingAttentionMetrics(k=k)
    acc.update(p, q)
    want = topk_recall_rows(p, q, k=k).double().mean()  # per row in p's dtype
    assert acc.compute()["topk_recall_mean"] == pytest.approx(float(want), rel=4 * torch.finfo(dtype).eps)


# ------------------------------------------------- long rows: two-stage top-k, tie subsets


@pytest.mark.parametrize("n", [192, 256, 263, 1000])
@pytest.mark.parametrize("kk", [1, 4, 6])
def test_two_stage_topk_picks_the_values_of_torch_topk(n, kk):
    """Issue 12: rows of many chunks take the top-k of the best chunks; fresh random keys with
    heavy ties (a few distinct values), a tail past the last whole chunk, rows whose top
    values sit in one chunk, and masked (-inf) keys."""
    from hla_analysis.metrics.streaming import _nonnegative_key, _topk_index

    g = torch.Generator().manual_seed(n + kk)
    for levels in (3, 50, 10**6):
        x = torch.randint(0, levels, (5, 7, n), generator=g).float() / levels
        x[0, 0, 8:16] = 2.0  # every top value in one chunk
        x[1, :, n // 2 :] = float("-inf")  # masked keys
        keys = _nonnegative_key(x)
        index = _topk_index(keys, kk)
        want = torch.topk(keys, kk, dim=-1).values
        assert torch.equal(keys.gather(-1, index), want)
        assert (index.sort(-1).values.diff(dim=-1) > 0).all()  # distinct keys picked


@pytest.mark.parametrize("causal,pad", [(False, False), (True, True)])
def test_long_rows_with_ties_match_numpy(causal, pad):
    """Rows long enough for the two-stage top-k (N = 300), weights with ties in a few rows
    (Spearman's tie ranks on those rows only, in the scores' order): per-metric agreement
    with the NumPy/SciPy reference, and failure counts with every kind of bad entry."""
    from hla_analysis.metrics import topk_recall_rows

    n = 300
    p, q, allowed, scores, v, _ = make_head(60 + causal, n, causal=causal, pad=pad)
    q = q.clone()
    q[::7, 100:140] = q[::7, 100:140].mean(-1, keepdim=True)  # ties in every 7th row
    q[::5, 7:14] = q[::5, 7:14].amax(-1, keepdim=True) * 20  # 7 tied at the top: across the top-5 cut
    q = q * allowed / (q * allowed).sum(-1, keepdim=True)
    got = head_metrics(p, q, allowed=allowed, v=v, scores=scores, k=5)
    want = numpy_reference(p, q, allowed, v, scores, np.ones(n, bool), 5, KL_EPS)
    # NumPy's argsort breaks ties at the cut arbitrarily; the plain per-row function averages them
    want["topk_recall_mean"] = float(topk_recall_rows(p, q, allowed=allowed, k=5).mean())
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key

    broken = q.clone()
    last = n - 1  # an allowed key of the last row in every setting
    bad = {3: float("nan"), 8: -float("nan"), 12: float("inf"), 20: -float("inf"), 33: -1e-3}
    for row, value in bad.items():
        broken[row + (n // 2 if causal else 0), last if not pad else 0] = value
    got = head_metrics(p, broken, allowed=allowed, v=v, scores=scores, k=5)
    assert (got["nonfinite_rows"], got["negative_rows"], got["failed_rows"]) == (4, 1, 5)


@pytest.mark.parametrize("causal", [False, True])
def test_one_slab_gives_the_slabs_values(monkeypatch, causal):
    """The divergence terms run in cache-sized row slabs on the CPU and in one pass on a GPU
    (slabs there only multiply kernel launches). Both give the same values, on a block large
    enough to be cut into slabs, with ties inside rows and across the top-5 cut."""
    from hla_analysis.metrics import streaming

    n, heads = 300, 3
    parts = [make_head(80 + h + 5 * causal, n, causal=causal, pad=False, dtype=torch.float32) for h in range(heads)]
    p, q, allowed, scores, v = (torch.stack([part[i] for part in parts]) for i in range(5))
    q = q.clone()
    q[:, ::7, 100:140] = q[:, ::7, 100:140].mean(-1, keepdim=True)
    q[:, ::5, 7:14] = q[:, ::5, 7:14].amax(-1, keepdim=True) * 20
    q = q * allowed / (q * allowed).sum(-1, keepdim=True)
    assert p[..., :1, :].numel() * n > streaming._SLAB_ELEMENTS  # the CPU form cuts slabs

    def run():
        acc = StreamingAttentionMetrics(k=5, batch_dims=1, rank_stride=2)
        acc.update(p, q, allowed=allowed, v=v, scores=scores)
        return acc.compute()

    slabs = run()
    monkeypatch.setattr(streaming, "_SLAB_ELEMENTS", 2**40)
    one = run()
    assert slabs.keys() == one.keys()
    for key in slabs:
        # per-row float32 sums over n keys, summed in float64: at most n eps32 apart
        torch.testing.assert_close(one[key], slabs[key], rtol=n * torch.finfo(torch.float32).eps, atol=1e-12,
                                   equal_nan=True, msg=key)


def test_fused_divergence_form_equals_the_slab_form():
    """The plain-expression divergence terms (what torch.compile fuses on a GPU) give the
    values of the in-place slab form, on rows with zeros in p and q (support, floor, 0 log 0)."""
    import dataclasses

    from hla_analysis.metrics import streaming

    g = torch.Generator().manual_seed(5)
    p = torch.rand(4, 33, 70, generator=g)
    q = torch.rand(4, 33, 70, generator=g)
    p[..., ::3] = 0.0
    q[..., ::6] = 0.0  # where p is 0 too: only the row below is floored
    q[0, 0, 2] = 0.0  # p > 0 there: below KL_EPS, a floored row
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    log_p = torch.log(torch.where(p > 0, p, torch.ones(())))
    eps = KL_EPS
    want = streaming._divergence_slab(p, log_p, p > 0, q.clone(), eps)
    got = streaming.divergence_rows(p, log_p, q, eps, streaming._log_eps(eps, q.dtype))
    for field, value in zip(dataclasses.fields(want), got):
        expected = getattr(want, field.name)
        assert value.dtype == expected.dtype, field.name
        # per-row float32 sums of 70 terms, in another order of operations: 70 eps32 relative
        torch.testing.assert_close(value, expected, rtol=70 * torch.finfo(torch.float32).eps, atol=1e-6, msg=field.name)
    assert got[1].sum() == 1 and bool(got[1][0, 0])
