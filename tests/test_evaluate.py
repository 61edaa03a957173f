"""Model-level evaluation on a tiny MiniLM capture: softmax faithful, statuses, resume."""

import pytest

pytest.importorskip("transformers")

from hla_analysis.capture import capture  # noqa: E402
from hla_analysis.compare import run_comparison  # noqa: E402
from hla_analysis.evaluate import run_model_evaluation  # noqa: E402

VARIANTS = "softmax;linear:phi=hedgehog;linear:phi=identity"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cap = capture("minilm", out=root / "cap", num_inputs=5, max_tokens=16, progress=False)
    from hla_analysis.fit import FitConfig

    run_comparison(cap, out=root / "r.parquet", variants=VARIANTS, train_inputs=2, fit=FitConfig(steps=3),
                   progress=False)
    return root, cap


@pytest.mark.slow
def test_evaluate_minilm(tiny, monkeypatch):
    root, cap = tiny
    out = root / "m.csv"
    table = run_model_evaluation("minilm", capture=cap, results=root / "r.parquet", out=out, progress=False)
    assert set(table["input"][table["input"] >= 0]) == {2, 3, 4}  # held-out only
    soft = table[(table.variant == "softmax") & (table.metric == "embedding_cosine")]
    assert soft["value"].min() >= 0.99999 and (soft.status == "ok").all()
    assert set(table.swap_mode) == {"single", "cumulative"} and set(table.layer) == set(range(6))
    assert set(table[table.variant == "linear:phi=hedgehog"].objective) == {"map_kl", "output_mse"}
    ident = table[table.variant == "linear:phi=identity"]
    assert (ident.status == "normaliser_failed").any()
    assert (ident[ident.metric == "failed_fraction"]["value"] > 0).all()
    assert (root / "m.fits.safetensors").is_file()
    # resume: finished parts are read back, not recomputed
    import hla_analysis.evaluate as ev

    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    (root / "m2.csv.parts").mkdir()
    calls = []
    real = ev._run_variant
    monkeypatch.setattr(ev, "_run_variant", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    first = run_model_evaluation("minilm", capture=cap, results=root / "r.parquet", out=root / "m2.csv",
                                 variants="softmax", progress=False)
    n = len(calls)
    import shutil

    # simulate an interruption after the parts were written: keep them, rerun
    parts2 = root / "m3.csv.parts"
    monkeypatch.setattr(ev.shutil, "rmtree", lambda p: None)
    run_model_evaluation("minilm", capture=cap, results=root / "r.parquet", out=root / "m3.csv", variants="softmax",
                         progress=False)
    again = run_model_evaluation("minilm", capture=cap, results=root / "r.parquet", out=root / "m3.csv",
                                 variants="softmax", progress=False)
    assert len(calls) == n + 1 and parts2.is_dir() and len(again) == len(first)
    shutil.rmtree(parts2)


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from hla_analysis.cli import main

    code = main(["evaluate", "--model", "minilm", "--capture", str(tmp_path), "--results", str(tmp_path / "r.parquet"),
                 "--out", str(tmp_path / "m.txt")])
    err = capsys.readouterr().err
    assert code == 1 and "must end in .parquet or .csv" in err and "Traceback" not in err


def test_output_mse_objective_fits_outputs():
    import torch

    from hla_analysis.fit import FitConfig, fit_variant
    from hla_analysis.variants import make_variant

    g = torch.Generator().manual_seed(0)
    batch = {"q": torch.randn(2, 16, 4, generator=g) * 2, "k": torch.randn(2, 16, 4, generator=g) * 2,
             "v": torch.randn(2, 16, 4, generator=g), "scale": 0.5, "causal": False}
    result = fit_variant(make_variant("linear:phi=hedgehog").bind(4, heads=2), [batch],
                         config=FitConfig(steps=20, objective="output_mse"))
    assert result.final_loss < result.initial_loss
    with pytest.raises(ValueError, match="objective"):
        FitConfig(objective="mse")
    no_v = {k: v for k, v in batch.items() if k != "v"}
    with pytest.raises(ValueError, match="'v'"):
        fit_variant(make_variant("linear:phi=hedgehog").bind(4, heads=2), [no_v],
                    config=FitConfig(objective="output_mse"))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_block_cache_equals_plain_forward(arch, monkeypatch):
    """The block-reuse fast path gives the outputs of plain full forwards, single and cumulative swaps."""
    import torch

    import hla_analysis.evaluate as ev
    from tests.test_swap import _bert, _ids, _llama

    causal = arch == "llama"
    net = _llama() if causal else _bert()
    net.set_attn_implementation("eager")
    # the metrics of a random tiny model sit at 1 - 1e-7; compare the raw outputs instead
    monkeypatch.setattr(ev, "_metrics", lambda ref, out, ids, causal, measure=None: [
        (None, f"out{j}", float(x)) for j, x in enumerate(out.flatten()[::7])])
    ids = _ids(3, 12, seed=5)
    layers = list(range(net.config.num_hidden_layers))
    order = ev.layer_order(net, ids, causal)
    blocks = ev.BlockCache.find(net, len(layers))
    assert blocks is not None and ev._blocks_match(blocks, order)
    ref = ev._forward(net, ids, causal)
    specs = ("hla:m=2,phi=affine", "linear:phi=elu1")
    plain = {s: ev._run_variant(net, s, "map_kl", None, ids, ref, causal, len(layers), layers, ev.SWAP_MODES)
             for s in specs}
    with ev.BlockCache(blocks) as cache:
        cache.set()
        ref_cached = ev._forward(net, ids, causal)
        fast = {s: ev._run_variant(net, s, "map_kl", None, ids, ref_cached, causal, len(layers), layers,
                                   ev.SWAP_MODES, cache=cache, order=order) for s in specs}
        assert cache.hits > 0
    assert "forward" not in blocks[0].__dict__  # the blocks are restored
    assert torch.equal(ref, ref_cached)
    scale = max(abs(r[-2]) for r in plain[specs[0]])
    for s in specs:
        assert len(plain[s]) == len(fast[s])
        for a, b in zip(plain[s], fast[s]):
            assert a[:-2] == b[:-2] and a[-1] == b[-1]
            # the same float32 operations on the same tensors: equal up to a few ulps
            assert abs(a[-2] - b[-2]) <= 1e-6 * scale, (a, b)
    # the variants move the outputs by far more than that tolerance: the comparison can fail
    assert max(abs(a[-2] - b[-2]) for a, b in zip(fast[specs[0]], fast[specs[1]])) > 1e-4 * scale


@pytest.mark.slow
def test_evaluate_uses_given_fits(tiny, monkeypatch, tmp_path):
    """--fits: parameters the file holds are used as they are; only the missing layers are fitted."""
    import torch

    import hla_analysis.evaluate as ev
    from hla_analysis.capture import load_capture
    from hla_analysis.swap import fit_key, load_fits, save_fits
    from hla_analysis.variants import make_variant

    root, cap_dir = tiny
    cap = load_capture(cap_dir)
    spec = make_variant("linear:phi=hedgehog").spec
    given = {}
    for layer in range(cap.num_layers - 1):  # the last layer is left for evaluate to fit
        var = make_variant(spec).bind(cap.head_dim, heads=cap.num_heads)
        torch.manual_seed(layer)
        for name, t in var.state_dict().items():
            given[fit_key(layer, spec, "map_kl") + name] = torch.randn_like(t) * 0.1
    path = save_fits(tmp_path / "r.fits.safetensors", given)
    fitted_layers = []
    real = ev.fit_variant
    monkeypatch.setattr(ev, "fit_variant",
                        lambda v, b, config: fitted_layers.append(config.objective) or real(v, b, config=config))
    out = tmp_path / "m.parquet"
    table = ev.run_model_evaluation("minilm", capture=cap_dir, results=root / "r.parquet", out=out,
                                    variants="linear:phi=hedgehog", objectives=("map_kl",), fits=path,
                                    max_heldout=3, progress=False)
    assert fitted_layers == ["map_kl"]  # the one layer the file lacks
    written = load_fits(out.with_name("m.fits.safetensors"))
    assert all(torch.equal(written[k], t) for k, t in given.items())
    assert sum(k.startswith(fit_key(cap.num_layers - 1, spec, "map_kl")) for k in written) > 0
    assert set(table.objective) == {"map_kl"} and table.value.notna().all()
    # the given parameters are the ones the model ran with: other parameters give other numbers
    other = {k: t * 3 for k, t in given.items()}
    save_fits(tmp_path / "o.fits.safetensors", other)
    # out must not be o.parquet: its o.fits.safetensors is the given file, which evaluate did not write
    table2 = ev.run_model_evaluation("minilm", capture=cap_dir, results=root / "r.parquet", out=tmp_path / "o2.parquet",
                                     variants="linear:phi=hedgehog", objectives=("map_kl",),
                                     fits=tmp_path / "o.fits.safetensors", max_heldout=3, progress=False)
    cos = lambda t: t[(t.metric == "embedding_cosine") & (t.input < 0) & (t.layer == 0)
                      & (t.swap_mode == "single")].value.iloc[0]
    assert cos(table) != cos(table2)


def _next_token_tolerance(head, hidden, logits, kl_terms):
    """Bound on blocked-vs-plain differences from float32 arithmetic.

    Logits of a chunk may round differently from the full product: at most ``h * eps`` times
    ``sum_i |h_i| |W_vi|`` (the standard dot-product bound); log-softmax moves by at most twice
    that, the KL's terms by four times, and each vocabulary sum adds ``V * eps`` times the sum
    of its absolute terms.
    """
    import torch

    eps = torch.finfo(torch.float32).eps
    width, vocab = hidden.shape[-1], logits.shape[-1]
    dots = float((hidden.abs() @ head.weight.abs().T).max().detach())
    if head.bias is not None:
        dots += float(head.bias.abs().max().detach())
    return 4 * width * eps * dots + vocab * eps * float(kl_terms.max()) + 8 * eps * float(logits.abs().max())


@pytest.mark.parametrize("keep", [2**26, 0])
def test_next_token_measure_blocked_equals_plain(keep):
    """The blocked LM-head measure gives the plain full-logits NLL, perplexity and KL (kept or recomputed ref)."""
    import torch

    from hla_analysis.evaluate import NextTokenMeasure, _metrics

    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(24, 301, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(301, 24, generator=g))
        head.bias.copy_(torch.randn(301, generator=g))
    ids = torch.randint(0, 301, (3, 17), generator=g)
    ref_h = torch.randn(3, 17, 24, generator=g)
    out_h = ref_h + 0.3 * torch.randn(3, 17, 24, generator=g)
    with torch.no_grad():
        ref_logits, out_logits = head(ref_h), head(out_h)
    plain = _metrics(ref_logits, out_logits, ids, True)
    measure = NextTokenMeasure(head, ref_h, ids, chunk=7, keep_elements=keep)  # 48 positions: 7 chunks
    assert (measure.kept is None) == (keep == 0) and len(measure.chunks) == 7
    blocked = _metrics(ref_h, out_h, ids, True, measure)
    lp_ref = torch.log_softmax(ref_logits[:, :-1], -1)
    terms = (lp_ref.exp() * (lp_ref - torch.log_softmax(out_logits[:, :-1], -1))).abs().sum(-1)
    tol = _next_token_tolerance(head, torch.cat([ref_h, out_h]), torch.cat([ref_logits, out_logits]), terms)
    assert [r[:2] for r in plain] == [r[:2] for r in blocked]
    for (i, metric, a), (_, _, b) in zip(plain, blocked):
        scale = a if metric.startswith("perplexity") else 1.0  # exp(mean nll): relative error
        assert abs(a - b) <= tol * max(scale, 1.0), (metric, i, a, b, tol)
    kl = {m: v for i, m, v in blocked if i is None}["next_token_kl"]
    assert kl > 1e3 * tol  # the swapped states really differ: the comparison above could fail


def test_resolve_fits_auto(tmp_path):
    from hla_analysis.evaluate import resolve_fits

    results = tmp_path / "results.parquet"
    assert resolve_fits("auto", results) is None  # compare wrote no fits (no learnable variant)
    (tmp_path / "results.fits.safetensors").write_bytes(b"x")
    assert resolve_fits("auto", results) == tmp_path / "results.fits.safetensors"
    assert resolve_fits(None, results) is None and resolve_fits("f.safetensors", results).name == "f.safetensors"


def test_fast_path_equals_plain_llama():
    """Block reuse + blocked LM head give the plain path's perplexity and next-token KL on a small Llama."""
    import torch

    import hla_analysis.evaluate as ev
    from tests.test_swap import _ids, _llama

    net = _llama(attention_scale=25)
    ids = _ids(3, 12, seed=5)
    layers = list(range(net.config.num_hidden_layers))
    order = ev.layer_order(net, ids, True)
    head = ev.blocked_head(net, ids)
    assert head is net.lm_head
    ref_logits = ev._forward(net, ids, True)
    specs = ("hla:m=2,phi=affine", "linear:phi=elu1")
    plain = {s: ev._run_variant(net, s, "map_kl", None, ids, ref_logits, True, len(layers), layers, ev.SWAP_MODES)
             for s in specs}
    blocks = ev.BlockCache.find(net, len(layers))
    with ev.BlockCache(blocks) as cache:
        cache.set()
        ref = ev._forward(net, ids, True, blocked=True)
        measure = ev.NextTokenMeasure(head, ref, ids, chunk=5)
        fast = {s: ev._run_variant(net, s, "map_kl", None, ids, ref, True, len(layers), layers, ev.SWAP_MODES,
                                   cache=cache, order=order, measure=measure) for s in specs}
        assert cache.hits > 0
    hidden = ev._forward(net, ids, True, blocked=True)
    tol = _next_token_tolerance(head, hidden, ref_logits, torch.ones(1))
    for s in specs:
        assert [r[:-2] for r in plain[s]] == [r[:-2] for r in fast[s]]
        assert [r[-1] for r in plain[s]] == [r[-1] for r in fast[s]]
        for a, b in zip(plain[s], fast[s]):
            # perplexity = exp(mean NLL): its error is relative
            scale = a[-2] if a[-3] in ("perplexity", "perplexity_original") else 1.0
            assert abs(a[-2] - b[-2]) <= tol * max(scale, 1.0), (a, b, tol)
    kls = [r[-2] for r in fast[specs[0]] if r[-3] == "next_token_kl"]
    assert max(kls) > 100 * tol  # the variant moves the model by far more than the tolerance


@pytest.mark.slow
def test_evaluate_plain_equals_fast(tiny, tmp_path):
    """run_model_evaluation: --plain (no reuse) and the fast path write the same table; fits auto + overrides."""
    import json

    import numpy as np

    root, cap = tiny
    kwargs = dict(capture=cap, results=root / "r.parquet", variants="softmax;linear:phi=hedgehog;hla:m=2,phi=affine",
                  fits="auto", fit_overrides={"steps": 2, "max_rows": 8}, max_heldout=3, max_tokens=12,
                  progress=False)
    fast = run_model_evaluation("minilm", out=tmp_path / "fast.parquet", **kwargs)
    plain = run_model_evaluation("minilm", out=tmp_path / "plain.parquet", plain=True, **kwargs)
    s_fast = json.loads((tmp_path / "fast.settings.json").read_text())
    s_plain = json.loads((tmp_path / "plain.settings.json").read_text())
    assert s_fast["block_cache"] and not s_plain["block_cache"] and s_fast["tokens"] == 12
    assert {"fit", "load_model", "reference", "swaps"} <= set(s_fast["stages"])
    # map KL fits came from compare (3 steps), output MSE fits ran here with the overrides
    assert s_fast["fit_settings"]["map_kl"]["steps"] == 3 and s_fast["fit_settings"]["output_mse"]["steps"] == 2
    assert all(r.get("source") == "given fits" for r in s_fast["fit_log"] if r["objective"] == "map_kl")
    hh = fast[fast.variant == "linear:phi=hedgehog"]
    assert set(zip(hh.objective, hh.fit_steps, hh.fit_max_rows)) == {("map_kl", 3, 512), ("output_mse", 2, 8)}
    keys = ["variant", "objective", "layer", "swap_mode", "input", "metric"]
    a, b = fast.sort_values(keys).reset_index(drop=True), plain.sort_values(keys).reset_index(drop=True)
    assert a[keys + ["status"]].equals(b[keys + ["status"]])
    # cosines and Spearman of the same float32 operations on the same tensors: a few ulps
    assert np.allclose(a.value, b.value, rtol=0, atol=16 * np.finfo(np.float32).eps, equal_nan=True)
    moved = a[(a.metric == "embedding_cosine") & (a.variant != "softmax")].value
    assert (1 - moved).max() > 1e3 * np.finfo(np.float32).eps  # the variants change the embeddings


class _FakeCapture:
    """Random q, k, v of 3 layers x 2 heads, 3 inputs of 24 tokens (what fit_parameters reads)."""

    num_layers, num_heads, head_dim = 3, 2, 8

    def __init__(self, causal):
        import torch

        g = torch.Generator().manual_seed(11)
        self.causal = causal
        self.data = {(layer, i): {n: torch.randn(2, 24, 8, generator=g) * (1.5 if n != "v" else 1.0)
                                  for n in ("q", "k", "v")} for layer in range(3) for i in range(3)}

    def get(self, layer, i, verify=True):
        return {**self.data[layer, i], "scale": 8 ** -0.5, "causal": self.causal}


@pytest.mark.parametrize("objective", ["map_kl", "output_mse"])
def test_joint_fits_match_per_layer_fits(objective):
    """All layers in one optimisation fit each layer as well as its own optimisation does.

    The joint loss scales each layer's gradient by a constant (its share of the rows); Adam's
    update m / (sqrt(v) + eps) is invariant to that except through eps = 1e-8 (entries whose
    gradient is near eps) and through rows of other layers whose validity changes between
    steps (the shared count). On these weak random fits (the fit gains ~3% of the loss, so
    gradients are small) that moves each layer's training loss by up to ~7% of its gain;
    a wrong split (one layer's parameters on another layer) moves it by far more.
    """
    import torch

    from hla_analysis.evaluate import _train_batch, fit_parameters
    from hla_analysis.fit import FitConfig, fit_variant
    from hla_analysis.swap import fit_key
    from hla_analysis.variants import make_variant

    cap = _FakeCapture(causal=objective == "output_mse")
    spec = make_variant("hla:m=2,phi=affine,proj=1").spec
    fit = {"steps": 8, "lr": 0.01, "seed": 0, "row_stride": 1, "max_rows": 16}
    kwargs = dict(train_inputs=2, fit=fit, objectives=(objective,))
    joint, log_joint = fit_parameters(cap, [spec], joint=True, **kwargs)
    alone, log_alone = fit_parameters(cap, [spec], joint=False, **kwargs)
    assert sorted(joint) == sorted(alone) and len(joint) == 3
    assert all(r["joint_layers"] == 3 for r in log_joint) and all("joint_layers" not in r for r in log_alone)

    def loss(state, layer):
        variant = make_variant(spec).bind(8, heads=2)
        if state is not None:
            variant.load_state_dict(state)
        config = FitConfig(**{**fit, "steps": 0, "objective": objective})
        return fit_variant(variant, [_train_batch(cap, [layer], 2)], config=config).final_loss

    for layer in range(3):
        key = fit_key(layer, spec, objective) + "proj.0"
        start, own, shared = loss(None, layer), loss({"proj.0": alone[key]}, layer), loss({"proj.0": joint[key]}, layer)
        assert start - own > 1e-4 * start  # the fit gained something
        assert abs(shared - own) <= 0.15 * (start - own), (layer, start, own, shared)
    # different layers got different parameters (the split is by layer)
    assert not torch.equal(joint[fit_key(0, spec, objective) + "proj.0"], joint[fit_key(1, spec, objective) + "proj.0"])


def test_two_heldout_inputs_give_no_nan_rows_marked_ok(tiny, tmp_path):
    """Pairwise Spearman needs >= 3 pairs' worth of inputs: with 2 held-out inputs it is left out, not
    written as NaN with status ok; with 3 it is there and finite."""
    import math

    root, cap = tiny
    kwargs = dict(capture=cap, results=root / "r.parquet", variants="softmax", progress=False)
    two = run_model_evaluation("minilm", out=tmp_path / "two.csv", max_heldout=2, **kwargs)
    assert "pairwise_spearman" not in set(two.metric)
    ok = two[two.status == "ok"]
    assert len(ok) and all(math.isfinite(v) for v in ok["value"])
    three = run_model_evaluation("minilm", out=tmp_path / "three.csv", **kwargs)
    spearman = three.loc[three.metric == "pairwise_spearman", "value"]
    assert len(spearman) and all(math.isfinite(v) for v in spearman)


def test_fits_of_another_shape_fail_in_one_line_and_leave_nothing(tiny, tmp_path):
    """Given fits that do not fit the model: the error names the mismatch and the fix, and the run
    leaves no parts folder behind, so the corrected command runs at once."""
    import torch

    from hla_analysis.swap import fit_key, save_fits
    from hla_analysis.variants import make_variant

    root, cap = tiny
    spec = make_variant("linear:phi=hedgehog").spec
    wrong = {fit_key(layer, spec, "map_kl") + name: torch.zeros(3, 5)
             for layer in range(6) for name in make_variant(spec).bind(32, heads=12).state_dict()}
    path = save_fits(tmp_path / "wrong.fits.safetensors", wrong)
    kwargs = dict(capture=cap, results=root / "r.parquet", out=tmp_path / "e.csv", variants="linear:phi=hedgehog",
                  objectives=("map_kl",), max_heldout=3, progress=False)
    with pytest.raises(ValueError, match=r"layer 0 linear:phi=hedgehog \(map_kl\): maps.0.weight is \[3, 5\] but 12 "
                                         r"heads of size 32 need \[12, 32, 32\].*leave --fits out") as info:
        run_model_evaluation("minilm", fits=path, **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "e.csv.parts").exists()
    from hla_analysis.fit import FitConfig  # noqa: F401  (the corrected run fits its own, 2 steps)

    table = run_model_evaluation("minilm", fit_overrides={"steps": 2}, **kwargs)
    assert table.value.notna().all()


def _hedgehog_fits(cap_dir):
    """Per-layer hedgehog parameters of the right names and shapes for the ``tiny`` capture."""
    import torch

    from hla_analysis.capture import load_capture
    from hla_analysis.swap import fit_key
    from hla_analysis.variants import make_variant

    cap = load_capture(cap_dir)
    spec = make_variant("linear:phi=hedgehog").spec
    state = make_variant(spec).bind(cap.head_dim, heads=cap.num_heads).state_dict()
    return {fit_key(layer, spec, "map_kl") + n: torch.zeros_like(t) for layer in range(cap.num_layers)
            for n, t in state.items()}


def _plain_safetensors(path, tensors, metadata=None):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


def _case_no_metadata(tmp_path, fits):
    return _plain_safetensors(tmp_path / "f.safetensors", fits)


def _case_foreign_format(tmp_path, fits):
    return _plain_safetensors(tmp_path / "f.safetensors", fits, {"format": "pt", "settings": "{}"})


def _case_foreign_names(tmp_path, fits):
    from hla_analysis.swap import save_fits

    return save_fits(tmp_path / "f.safetensors", {"encoder.weight": next(iter(fits.values()))})


def _case_layer_out_of_range(tmp_path, fits):
    from hla_analysis.swap import save_fits

    extra = {k.replace("layer.0.", "layer.6.", 1): t.clone() for k, t in fits.items() if k.startswith("layer.0.")}
    return save_fits(tmp_path / "f.safetensors", {**fits, **extra})


def _case_wrong_parameter(tmp_path, fits):
    from hla_analysis.swap import save_fits

    return save_fits(tmp_path / "f.safetensors", {k.replace("maps.0.weight", "maps.1.weight"): t
                                                  for k, t in fits.items()})


def _case_other_capture(tmp_path, fits):
    from hla_analysis.swap import save_fits

    return save_fits(tmp_path / "f.safetensors", fits, settings={"tool": "hla-analysis compare",
                                                                 "capture": "/elsewhere/cap",
                                                                 "capture_sha256": "0" * 64})


@pytest.mark.parametrize("make, message", [
    (_case_no_metadata, "is not a fits file written by hla-analysis (it has no safetensors metadata)"),
    (_case_foreign_format, "its metadata names the format 'pt', not 'hla-analysis-fits'"),
    (_case_foreign_names, "holds a tensor 'encoder.weight', not named layer.<l>.<variant>.<objective>.<parameter>"),
    (_case_layer_out_of_range, "holds fits of layer 6 but the capture has 6 layers"),
    (_case_wrong_parameter, "holds the parameters ['maps.1.weight'], but the variant has ['maps.0.weight']"),
    (_case_other_capture, "was fitted on another capture (/elsewhere/cap)"),
])
def test_evaluate_refuses_a_safetensors_file_that_is_not_these_fits(tiny, tmp_path, capsys, monkeypatch, make,
                                                                    message):
    """--fits FILE: a safetensors file compare (or evaluate) did not write for this capture and these
    variants is refused in one line before the model loads, and the run leaves nothing behind."""
    import hla_analysis.evaluate as ev
    from hla_analysis.cli import main

    root, cap = tiny
    monkeypatch.setattr(ev, "_load", lambda *a, **k: pytest.fail("the model was loaded"))
    path = make(tmp_path, _hedgehog_fits(cap))
    out = tmp_path / "e.csv"
    code = main(["evaluate", "--model", "minilm", "--capture", str(cap), "--results", str(root / "r.parquet"),
                 "--variants", "linear:phi=hedgehog", "--objectives", "map_kl", "--fits", str(path),
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and str(path) in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "e.csv.parts").exists()


def test_compare_fits_name_their_format_and_older_ones_are_still_read(tiny, tmp_path):
    """compare's fits file names its format in its metadata; one written before it did (metadata:
    only compare's settings) still passes evaluate's checks."""
    import json

    from safetensors import safe_open

    from hla_analysis.capture import load_capture
    from hla_analysis.evaluate import check_given_fits
    from hla_analysis.swap.fits import read_fits_file

    root, cap_dir = tiny
    path = root / "r.fits.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "hla-analysis-fits" and metadata["format_version"] == "1"
    fits, settings = read_fits_file(path)
    assert settings["tool"] == "hla-analysis compare" and fits
    cap = load_capture(cap_dir)
    check_given_fits(fits, settings, path, cap, cap_dir, ["linear:phi=hedgehog", "softmax"])
    old = _plain_safetensors(tmp_path / "old.fits.safetensors", fits, {"settings": json.dumps(settings)})
    old_fits, old_settings = read_fits_file(old)
    assert old_settings == settings and set(old_fits) == set(fits)
    check_given_fits(old_fits, old_settings, old, cap, cap_dir, ["linear:phi=hedgehog"])
