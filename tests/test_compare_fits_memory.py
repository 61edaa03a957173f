"""Issue 12: fitted parameters written beside the table, fits and metrics in row blocks
(memory bounded by N x block rows), and the shared-reference metrics against the plain rows."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hla_analysis.compare as compare_module
import hla_analysis.fit as fit_module
from hla_analysis.capture import capture, load_capture
from hla_analysis.compare import fits_path, run_comparison
from hla_analysis.fit import FitConfig, fit_variant, is_learnable
from hla_analysis.metrics import (
    StreamingAttentionMetrics,
    entropy_rows,
    js_divergence_rows,
    kl_divergence_rows,
    spearman_rows,
    topk_recall_rows,
    total_variation_rows,
)
from hla_analysis.metrics.streaming import reference_rows
from hla_analysis.ops import softmax_attention_map
from hla_analysis.swap.fits import layer_state, load_fits
from hla_analysis.variants import make_variant

LEARNABLE = "softmax;linear:phi=hedgehog;hla:m=2,phi=affine,proj=1"


@pytest.fixture(scope="module")
def tiny_capture(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmpfits") / "cap"
    capture("minilm", out=out, num_inputs=2, max_tokens=16, progress=False)
    return out


def test_fits_file_round_trips_and_swaps_in(tiny_capture, tmp_path):
    out = tmp_path / "r.parquet"
    table = run_comparison(tiny_capture, out=out, variants=LEARNABLE, fit=FitConfig(steps=3), progress=False)
    fits = load_fits(fits_path(out))
    cap = load_capture(tiny_capture)
    layer, head, spec = 1, 3, "linear:phi=hedgehog"
    state = layer_state(fits, layer, spec, "map_kl")
    assert state and all(math.isfinite(float(t.abs().sum())) for t in state.values())
    assert not layer_state(fits, layer, "softmax", "map_kl")  # nothing to fit, nothing written
    # the compare-time fit, redone (fits are deterministic), equals the stored parameters
    d = cap.get(layer, 0)
    batch = {"q": d["q"][None], "k": d["k"][None], "scale": d["scale"], "causal": d["causal"]}
    refit = make_variant(spec).bind(cap.head_dim, heads=cap.num_heads)
    fit_variant(refit, [batch], config=FitConfig(steps=3))
    for name, t in refit.state_dict().items():
        assert torch.equal(state[name], t.float()), name
    # a variant loaded from the file scores what the table says on the held-out input
    loaded = make_variant(spec).bind(cap.head_dim, heads=cap.num_heads)
    loaded.load_state_dict(state)
    held = cap.get(layer, 1)
    with torch.no_grad():
        w, den = loaded.weights(held["q"], held["k"], scale=held["scale"], causal=held["causal"])
        p = make_variant("softmax").attention_map(held["q"], held["k"], scale=held["scale"], causal=held["causal"])
    p_hat = (w / den)[head]
    kl = kl_divergence_rows(p[head], p_hat, eps=1e-30).mean()
    row = table[(table["input"] == 1) & (table["layer"] == layer) & (table["head"] == head)
                & (table["variant"] == spec) & (table["metric"] == "kl_mean")]
    # float32 maps over 16 keys, float64 sums: a few ulps times the conditioning of the logs
    assert float(row["value"].iloc[0]) == pytest.approx(float(kl), rel=1e-5, abs=1e-7)


def test_fits_file_is_resumed_and_guarded(tiny_capture, tmp_path, monkeypatch):
    out = tmp_path / "r.parquet"
    real = compare_module._layer_rows

    def crash(cap, layer, *args, **kwargs):
        if layer == 2:
            raise KeyboardInterrupt
        return real(cap, layer, *args, **kwargs)

    monkeypatch.setattr(compare_module, "_layer_rows", crash)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(tiny_capture, out=out, variants=LEARNABLE, fit=FitConfig(steps=2), progress=False)
    assert not fits_path(out).exists()
    monkeypatch.setattr(compare_module, "_layer_rows", real)
    run_comparison(tiny_capture, out=out, variants=LEARNABLE, fit=FitConfig(steps=2), progress=False)
    fresh = tmp_path / "fresh.parquet"
    run_comparison(tiny_capture, out=fresh, variants=LEARNABLE, fit=FitConfig(steps=2), progress=False)
    resumed, whole = load_fits(fits_path(out)), load_fits(fits_path(fresh))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    # a fits file the tool did not write is the user's: refused without --overwrite
    user = tmp_path / "u.parquet"
    fits_path(user).write_bytes(b"mine")
    with pytest.raises(ValueError, match="did not write"):
        run_comparison(tiny_capture, out=user, variants="softmax", progress=False)
    assert fits_path(user).read_bytes() == b"mine"


def _batch(g, heads, n, d, *, causal, dtype=torch.float64):
    q, k, v = (torch.randn(1, heads, n, d, generator=g, dtype=dtype) for _ in range(3))
    return {"q": q, "k": k, "v": v, "scale": d**-0.5, "causal": causal}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("spec", ["linear:phi=hedgehog", "hla:m=2,phi=affine,proj=1,shift=1"])
def test_fit_in_row_blocks_equals_one_block(spec, causal, monkeypatch):
    """In float64 the blocked gradient (a backward per block, divided by the row count at the
    end) equals the one-graph gradient up to ~1e-16 relative per step; 3 Adam steps of
    lr 0.01 keep parameters within 1e-9."""
    batch = _batch(torch.Generator().manual_seed(5), 2, 40, 4, causal=causal)

    def fitted():
        var = make_variant(spec).bind(4, heads=2).double()
        result = fit_variant(var, [batch], config=FitConfig(steps=3, row_stride=1))
        return result.losses, var.state_dict()

    whole_losses, whole = fitted()
    monkeypatch.setattr(fit_module, "FIT_MAP_ELEMENTS", 2 * 40 * 7)  # blocks of 7 rows
    assert len(fit_module._row_blocks(batch)) == 6
    block_losses, blocked = fitted()
    assert block_losses == pytest.approx(whole_losses, rel=1e-9)
    for name in whole:
        torch.testing.assert_close(blocked[name], whole[name], rtol=1e-9, atol=1e-12)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal", [False, True])
def test_memory_is_bounded_by_block_rows_not_n_squared(causal, monkeypatch):
    """A long input at small d: fits and metrics never make a tensor near N x N.

    N = 2,048 keys, 2 heads, block of 64 rows: one [I, H, 64, N] map has 262,144 entries,
    an N x N map of one head 4,194,304. Every tensor must stay within a few block maps.
    """
    n, heads, block = 2048, 2, 64
    monkeypatch.setattr(fit_module, "FIT_MAP_ELEMENTS", heads * block * n)
    g = torch.Generator().manual_seed(3)
    train = _batch(g, heads, n, 4, causal=causal, dtype=torch.float32)
    evaluate = _batch(g, heads, n, 4, causal=causal, dtype=torch.float32)
    specs = ("softmax", "linear:phi=elu1", "linear:phi=hedgehog", "hla:m=2,phi=affine,proj=1,shift=1")
    variants = {}
    with _LargestTensor() as fit_watch:
        for spec in specs:
            var = make_variant(spec).bind(4, heads=heads)
            if is_learnable(var):
                fit_variant(var, [train], config=FitConfig(steps=1, row_stride=1))
            variants[spec] = var
    with _LargestTensor() as eval_watch, torch.no_grad():
        metrics = compare_module._evaluate(variants, evaluate, block_rows=block, topk=5, rank_stride=4)
    block_map = heads * block * n
    assert fit_watch.largest <= 4 * block_map < n * n, fit_watch.largest
    assert eval_watch.largest <= 4 * block_map < n * n, eval_watch.largest
    assert all(math.isfinite(float(m["kl_mean"].sum())) for m in metrics.values())


@pytest.mark.parametrize("causal", [False, True])
def test_shared_reference_metrics_equal_the_plain_row_functions(causal):
    """The fused per-block path (one reference, many approximations) against the plain per-row
    functions, on fresh random rows with ties (ReLU zeros, rounded weights) and failed rows.

    float64 rows of 37 keys: every quantity is a sum of <= 37 terms of size <= 1, so two
    orderings differ by ~37 * 2**-52 * (log magnitude ~ 70 at the KL floor): rel 1e-10.
    """
    g = torch.Generator().manual_seed(11)
    r, n = 29, 37
    scores = torch.randn(3, r, n, generator=g, dtype=torch.float64) * 2
    allowed = None
    if causal:
        allowed = torch.arange(n)[None, :] <= torch.arange(n - r, n)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, -1)
    approx = [
        torch.softmax(torch.randn(3, r, n, generator=g, dtype=torch.float64), -1),
        torch.relu(torch.randn(3, r, n, generator=g, dtype=torch.float64)),  # many ties at 0
        torch.round(p * 20) / 20,  # ties near the top
    ]
    approx[1][0, 3] = -0.5  # a failed row (negative weight)
    approx[1][1, 4, 2] = float("nan")  # a failed row (NaN)
    v = torch.randn(3, n, 2, generator=g, dtype=torch.float64)
    ref = reference_rows(p, allowed=allowed, v=v, scores=scores, k=5)
    mask = torch.ones_like(p, dtype=torch.bool) if allowed is None else allowed.expand_as(p)
    for q in approx:
        q = torch.where(mask, q, 0.0)
        q = q / q.sum(-1, keepdim=True).clamp_min(1e-300)
        acc = StreamingAttentionMetrics(k=5)
        acc.update_against(ref, q)
        got = acc.compute()
        ok = torch.isfinite(q).all(-1) & (q >= 0).all(-1)
        qc, pc, sc, mc = q[ok], p[ok], scores[ok], mask[ok]
        want = {
            "kl_mean": kl_divergence_rows(pc, qc, allowed=mc, eps=1e-30).mean(),
            "js_mean": js_divergence_rows(pc, qc, allowed=mc).mean(),
            "tv_mean": total_variation_rows(pc, qc, allowed=mc).mean(),
            "entropy_ref_mean": entropy_rows(pc, allowed=mc).mean(),
            "entropy_approx_mean": entropy_rows(qc, allowed=mc).mean(),
            "topk_recall_mean": topk_recall_rows(pc, qc, allowed=mc, k=5).mean(),
            "spearman_mean": spearman_rows(sc, qc, allowed=mc).nanmean(),
        }
        assert got["failed_rows"] == int((~ok).sum())
        for name, value in want.items():
            assert got[name] == pytest.approx(float(value), rel=1e-10, abs=1e-12), name
        rel_f = math.sqrt(float(((pc - qc) ** 2).sum() / (pc**2).sum()))
        assert got["frobenius_rel"] == pytest.approx(rel_f, rel=1e-10)


def _separate_runs(batch, cap):
    """The capped rows as ``_RUNS`` batches of their own, each with an int offset (the layout
    before the runs were merged into one block)."""
    n, size = batch["q"].shape[-2], cap // fit_module._RUNS
    starts = [(i * (n - size)) // (fit_module._RUNS - 1) for i in range(fit_module._RUNS)]
    return [{**batch, "q": batch["q"][..., s : s + size, :], "query_offset": batch.get("query_offset", 0) + s}
            for s in starts]


def test_capped_rows_are_spread_contiguous_runs():
    q = torch.arange(1000.0).reshape(1, 1000, 1).expand(2, 1000, 1)
    causal = {"q": q, "k": q, "scale": 1.0, "causal": True, "query_offset": 5}
    runs = fit_module._cap_rows(causal, 80)  # causal: one batch per run, each with its offset
    assert len(runs) == fit_module._RUNS and sum(r["q"].shape[-2] for r in runs) == 80
    for run in runs:
        rows = run["q"][0, :, 0]
        assert torch.equal(rows, torch.arange(rows[0], rows[0] + 10))
        assert run["query_offset"] == 5 + int(rows[0])
    assert runs[0]["q"][0, 0, 0] == 0 and runs[-1]["q"][0, -1, 0] == 999  # first and last rows
    assert fit_module._cap_rows(causal, 1000) == [causal]
    # non-causal: the same rows in one batch, each row's position in a tensor offset
    (merged,) = fit_module._cap_rows({**causal, "causal": False}, 80)
    rows = merged["q"][0, :, 0]
    assert torch.equal(rows, torch.cat([r["q"][0, :, 0] for r in runs]))
    assert merged["query_offset"].dtype == torch.int64 and torch.equal(merged["query_offset"], rows.long() + 5)
    # blocks of the merged batch carry their slice of the positions
    blocks = fit_module._row_blocks(merged, map_elements=2 * 1000 * 30)
    assert [b["q"].shape[-2] for b in blocks] == [30, 30, 20]
    assert torch.equal(torch.cat([b["query_offset"] for b in blocks]), merged["query_offset"])


@pytest.mark.parametrize("spec", ["hla:m=2,phi=affine,proj=1,shift=1", "linear:phi=rebased",
                                  "hla:m=2,phi=cosformer,proj=1"])
def test_a_fit_on_causal_blocks_cut_at_their_last_row_equals_one_on_every_key(spec, monkeypatch):
    """float64, 3 Adam steps on blocks of 20 rows: cut and whole keys agree to rounding (Adam
    amplifies rounding about a thousandfold every three steps, so more steps would not)."""
    batch = _batch(torch.Generator().manual_seed(9), 2, 60, 4, causal=True)
    monkeypatch.setattr(fit_module, "FIT_MAP_ELEMENTS", 2 * 60 * 20)

    def fitted():
        var = make_variant(spec).bind(4, heads=2).double()
        return fit_variant(var, [batch], config=FitConfig(steps=3, row_stride=1)).losses, var.state_dict()

    cut_losses, cut = fitted()
    monkeypatch.setattr(fit_module, "_causal_horizon", lambda block, variant: block)
    whole_losses, whole = fitted()
    assert cut_losses == pytest.approx(whole_losses, rel=1e-9)
    for name in whole:
        torch.testing.assert_close(cut[name], whole[name], rtol=1e-9, atol=1e-12)


def test_strided_fit_rows_keep_their_positions():
    """Non-causal fits read every row_stride-th row: positional maps (cosFormer) must see rows
    0, s, 2s, ... at those positions, through capping and row blocks."""
    q = torch.arange(400.0).reshape(1, 400, 1).expand(2, 400, 1)
    batch = {"q": q, "k": q, "scale": 1.0, "causal": False, "query_offset": 3}
    strided = fit_module._subsample_rows(batch, 4)
    assert torch.equal(strided["query_offset"], torch.arange(3, 403, 4))
    (capped,) = fit_module._cap_rows(strided, 40)
    assert torch.equal(capped["query_offset"], capped["q"][0, :, 0].long() + 3)  # row r sits at r + 3
    blocks = fit_module._row_blocks(capped, map_elements=2 * 400 * 16)
    assert torch.equal(torch.cat([b["query_offset"] for b in blocks]), capped["query_offset"])


def test_causal_blocks_drop_the_keys_their_rows_cannot_see():
    """A causal block needs keys up to its last row only: the fit on truncated blocks is the fit
    on whole ones (float64), and cosFormer, whose features read the length, keeps every key."""
    batch = _batch(torch.Generator().manual_seed(6), 2, 60, 4, causal=True)
    var = make_variant("hla:m=2,phi=affine,proj=1").bind(4, heads=2)
    blocks = fit_module._row_blocks(batch, map_elements=2 * 60 * 20)
    cut = [fit_module._causal_horizon(b, var) for b in blocks]
    assert [b["k"].shape[-2] for b in cut] == [20, 40, 60]
    assert [fit_module._causal_horizon(b, var)["k"].shape[-2] for b in fit_module._row_blocks(
        {**batch, "causal": False}, map_elements=2 * 60 * 20)] == [60, 60, 60]
    cos = make_variant("linear:phi=cosformer").bind(4, heads=2)
    assert [fit_module._causal_horizon(b, cos)["k"].shape[-2] for b in blocks] == [60, 60, 60]
    for b, c in zip(blocks, cut):  # the same weights on the keys each row sees
        w, den = var.weights(b["q"], b["k"], scale=b["scale"], causal=True, query_offset=b["query_offset"])
        w_cut, den_cut = var.weights(c["q"], c["k"], scale=c["scale"], causal=True, query_offset=c["query_offset"])
        torch.testing.assert_close(w_cut, w[..., : c["k"].shape[-2]])
        assert not w[..., c["k"].shape[-2]:].any()
        torch.testing.assert_close(den_cut, den)


def test_query_positions_mask_rows_like_their_offsets():
    """A tensor ``query_offset`` gives each row its own causal horizon: the map of scattered
    rows equals the rows of the whole map, and bad positions are refused."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 12, 4, generator=g), torch.randn(2, 12, 4, generator=g)
    rows = torch.tensor([0, 1, 5, 6, 11])
    whole = softmax_attention_map(q, k, causal=True)
    part = softmax_attention_map(q[:, rows], k, causal=True, query_offset=rows)
    torch.testing.assert_close(part, whole[:, rows])  # float32 defaults: matmuls of other shapes round differently
    var = make_variant("hla:m=2,phi=affine").bind(4)
    w_whole, den_whole = var.weights(q, k, causal=True)
    w_part, den_part = var.weights(q[:, rows], k, causal=True, query_offset=rows)
    torch.testing.assert_close(w_part, w_whole[:, rows])
    torch.testing.assert_close(den_part, den_whole[:, rows])
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :6] = False  # batch 1: rows 0..5 see no real key
    with pytest.raises(ValueError, match="no key to attend to"):
        softmax_attention_map(q[:, rows], k, causal=True, query_offset=rows, key_padding_mask=mask)
    ok = softmax_attention_map(q[:, rows[3:]], k, causal=True, query_offset=rows[3:], key_padding_mask=mask)
    assert torch.allclose(ok.sum(-1), torch.ones(2, 2))
    for bad, match in ((torch.tensor([0, 12]), "positions from 0 to 12"), (torch.tensor([-1, 3]), "from -1 to 3"),
                       (torch.tensor([0.0, 1.0]), "1-D integer"), (torch.tensor([0, 1, 2]), "2 entries"),
                       (True, "an int or a 1-D"), (torch.tensor(True), "an int or a 1-D")):
        with pytest.raises(ValueError, match=match):
            softmax_attention_map(q[:, :2], k, causal=True, query_offset=bad)
    with pytest.raises(ValueError, match="positions from -5 to 100"):  # non-causal: only the sign matters
        make_variant("linear:phi=cosformer").weights(q[:, :2], k, query_offset=torch.tensor([-5, 100]))
    # any integer dtype (index_select takes int64 only), a 0-d tensor as an int offset
    small = softmax_attention_map(q[:, rows[3:]], k, causal=True, query_offset=rows[3:].to(torch.uint8),
                                  key_padding_mask=mask)
    torch.testing.assert_close(small, ok)
    torch.testing.assert_close(softmax_attention_map(q[:, 2:4], k, causal=True, query_offset=torch.tensor(2)),
                               whole[:, 2:4])


@pytest.mark.parametrize("causal", [False, True])
def test_capped_fit_equals_a_fit_on_its_runs(causal):
    """A fit with ``max_rows`` is the plain fit on the runs given as batches (float64: the same
    arithmetic in the same order, so equal to rounding), and its cost is bounded: no tensor
    larger than a few [H, max_rows, N] maps however long the input is."""
    n, heads, cap = 600, 2, 48
    batch = _batch(torch.Generator().manual_seed(8), heads, n, 4, causal=causal)
    spec = "hla:m=2,phi=affine,proj=1,shift=1"
    config = FitConfig(steps=3, row_stride=1, max_rows=cap)

    capped = make_variant(spec).bind(4, heads=heads).double()
    with _LargestTensor() as watch:
        capped_losses = fit_variant(capped, [batch], config=config).losses
    runs = _separate_runs(batch, cap)
    plain = make_variant(spec).bind(4, heads=heads).double()
    plain_losses = fit_variant(plain, runs, config=FitConfig(steps=3, row_stride=1, max_rows=n)).losses
    assert capped_losses == pytest.approx(plain_losses, rel=1e-12)
    for name, t in plain.state_dict().items():
        torch.testing.assert_close(capped.state_dict()[name], t, rtol=1e-12, atol=1e-14)
    assert watch.largest <= 4 * heads * cap * n < heads * n * n
    # uncapped, the same input trains on all its rows: a different fit
    whole = make_variant(spec).bind(4, heads=heads).double()
    fit_variant(whole, [batch], config=FitConfig(steps=3, row_stride=1, max_rows=n))
    assert not torch.equal(whole.state_dict()["proj.0"], plain.state_dict()["proj.0"])


def test_a_fit_step_reads_the_host_once_per_row_block(monkeypatch):
    """On a GPU every host read is a sync: the checks, the row count and the finiteness of a
    block's loss share one read (three before), plus the step's own loss read."""
    g = torch.Generator().manual_seed(0)
    heads, n, d = 2, 64, 8
    batch = {"q": torch.randn(1, heads, n, d, generator=g), "k": torch.randn(1, heads, n, d, generator=g),
             "scale": d ** -0.5, "causal": False}
    # 32 query rows per block: two blocks, whose softmax targets are still kept across steps
    monkeypatch.setattr(fit_module, "FIT_MAP_ELEMENTS", heads * 32 * n)
    blocks = len(fit_module._row_blocks(batch))
    assert blocks == 2
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _real=real, _name=name, **k: reads.append(_name) or _real(self, *a, **k))
    steps = 3
    variant = make_variant("hla:m=2,phi=affine,proj=1").bind(d, heads=heads)
    result = fit_variant(variant, [batch], config=FitConfig(steps=steps, row_stride=1))
    monkeypatch.undo()
    assert len(result.losses) == steps + 1
    # once: the targets' own input checks (three reads a block); per step: one read per block,
    # the loss's finiteness and its value; then the final loss. Three reads a block before.
    assert len(reads) <= 3 * blocks + steps * (blocks + 2) + (blocks + 1), (len(reads), reads)


def test_causal_blocks_scored_on_the_keys_they_see_equal_one_whole_block():
    """``_evaluate`` drops the keys past a causal block's last row: its metrics over blocks of 7
    rows (6 of 7 blocks cut) equal those of one block over every key. float64: each metric is
    a sum of <= 40 terms per row, so the orders differ by ~1e-14 relative. Included: a fitted
    variant, and the maps whose key features read other keys (cosFormer's length; exp's and
    FAVOR+'s shift, which a late outlier key sets), which keep every key."""
    g = torch.Generator().manual_seed(12)
    heads, n, d = 2, 40, 4
    batch = {name: torch.randn(2, heads, n, d, generator=g, dtype=torch.float64) for name in ("q", "k", "v")}
    batch["k"][:, :, -1] = 2000.0  # a late outlier key sets exp's and FAVOR+'s shift: underflow depends on it
    batch.update(scale=d ** -0.5, causal=True)
    specs = ("softmax", "linear:phi=elu1", "linear:phi=cosformer", "hla:m=2,phi=affine", "power:p=2",
             "hla:m=2,phi=affine,proj=1", "linear:phi=exp", "hla:m=2,phi=exp", "linear:phi=favor")
    variants = {}
    for spec in specs:
        var = make_variant(spec).bind(d, heads=heads).double()
        if is_learnable(var):
            with torch.no_grad():
                for prm in var.parameters():
                    prm.add_(0.1 * torch.randn(prm.shape, generator=g, dtype=prm.dtype))
        variants[spec] = var
    seen = []
    elu = variants["linear:phi=elu1"]
    real = elu.weights
    elu.weights = lambda q, k, **kw: seen.append(k.shape[-2]) or real(q, k, **kw)
    with torch.no_grad():
        whole = compare_module._evaluate(variants, batch, block_rows=n, topk=5, rank_stride=1)
        cut = compare_module._evaluate(variants, batch, block_rows=7, topk=5, rank_stride=1)
    assert seen == [40, 7, 14, 21, 28, 35, 40]  # each block's keys end at its last row
    assert whole["linear:phi=exp"]["failed_rows"].sum() > 0  # the outlier makes exp underflow somewhere
    for spec in specs:
        assert whole[spec].keys() == cut[spec].keys()
        for name, value in whole[spec].items():
            torch.testing.assert_close(cut[spec][name], value, rtol=1e-9, atol=1e-12, msg=f"{spec} {name}")
