"""Captures from the embedded causal SmolLM2 (Llama, GQA 9/3 heads, RoPE), converted from GGUF."""

from __future__ import annotations

import os

import pytest
import torch

from hla_analysis.capture import capture, load_capture, load_model
from hla_analysis.ops import softmax_attention_map

pytestmark = pytest.mark.slow

TEXTS = [
    "Rotary position embeddings rotate each pair of query and key features by an angle "
    "that grows with the token position, so dot products depend on relative offsets.",
    "Grouped keys save memory.",
]


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    # A private cache exercises the GGUF -> safetensors conversion once per test session.
    previous = os.environ.get("HLA_ANALYSIS_CACHE")
    os.environ["HLA_ANALYSIS_CACHE"] = str(tmp_path_factory.mktemp("hla_cache"))
    yield
    if previous is None:
        os.environ.pop("HLA_ANALYSIS_CACHE", None)
    else:
        os.environ["HLA_ANALYSIS_CACHE"] = previous


@pytest.fixture(scope="module")
def smollm2_capture(smollm2_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("cap") / "smol"
    capture("smollm2", out=out, num_inputs=2, max_tokens=48, texts=TEXTS, packing="document",
            batch_size=2, progress=False)
    return load_capture(out)


def _rope(x, theta):
    """Llama rotary embedding (rotate-half layout), written out independently of transformers."""
    n, d = x.shape[-2:]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def test_smollm2_softmax_matches_model_causal_every_layer_and_head(smollm2_capture):
    cap = smollm2_capture
    m = cap.manifest
    assert (cap.num_layers, cap.num_heads, m["num_kv_heads"], cap.head_dim) == (30, 9, 3, 64)
    assert m["causal"] is True and m["kv_head_for_query_head"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert cap.lengths[0] > cap.lengths[1]  # the batch was padded
    net = load_model("smollm2").model
    theta = net.config.rope_parameters["rope_theta"]
    checked_layer = 17
    worst = 0.0
    for i in range(cap.num_inputs):
        ids = cap.get(0, i)["input_ids"]
        projections = {}
        attn = net.layers[checked_layer].self_attn
        hooks = [getattr(attn, name).register_forward_hook(
                     lambda mod, a, o, name=name: projections.__setitem__(name, o))
                 for name in ("q_proj", "k_proj", "v_proj")]
        try:
            with torch.no_grad():
                probs = net(input_ids=ids[None], output_attentions=True).attentions
        finally:
            for h in hooks:
                h.remove()
        n = len(ids)
        upper = torch.ones(n, n, dtype=torch.bool).triu(1)
        for layer in range(cap.num_layers):
            d = cap.get(layer, i)
            assert d["q"].shape == d["k"].shape == d["v"].shape == (9, n, 64)
            assert d["causal"] is True and d["attention_mask"] is None
            model_probs = probs[layer][0]
            assert torch.all(model_probs[:, upper] == 0)  # strictly causal
            ours = softmax_attention_map(d["q"], d["k"], scale=d["scale"], causal=True)
            assert torch.all(ours[:, upper] == 0)
            worst = max(worst, float((ours - model_probs).abs().max()))
            # grouped key/value heads are shared by consecutive query heads
            assert torch.equal(d["k"][0], d["k"][2]) and torch.equal(d["v"][3], d["v"][5])
            assert not torch.equal(d["k"][0], d["k"][3])
        d = cap.get(checked_layer, i, as_recorded=True)  # undo the canonical scale split
        assert d["scale"] == pytest.approx(64 ** -0.5)
        q = projections["q_proj"][0].view(n, 9, 64).transpose(0, 1)
        k = projections["k_proj"][0].view(n, 3, 64).transpose(0, 1)
        v = projections["v_proj"][0].view(n, 3, 64).transpose(0, 1)
        # queries and keys are stored after RoPE, exactly as they enter the softmax
        torch.testing.assert_close(d["q"], _rope(q, theta), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(d["k"], _rope(k, theta).repeat_interleave(3, 0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(d["v"], v.repeat_interleave(3, 0), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(d["q"], q, atol=1e-2)  # RoPE really changed them
    assert worst <= 1e-5, worst
    assert m["max_abs_prob_error"] <= 1e-5


def test_smollm2_conversion_is_cached_and_stores_compact_kv(smollm2_capture):
    from hla_analysis.capture.models import cache_dir

    copies = [p for p in cache_dir().iterdir() if p.name.startswith("smollm2-")]
    assert len(copies) == 1 and (copies[0] / "model.safetensors").is_file()
    assert not [p for p in cache_dir().iterdir() if p.name.startswith(".")]  # no leftover temp dirs
    rec = smollm2_capture.manifest["inputs"][0]
    from safetensors import safe_open

    with safe_open(str(smollm2_capture.path / rec["file"]), framework="pt") as f:
        assert f.get_slice("layer.0.k").get_shape() == [3, rec["length"], 64]
        assert f.get_slice("layer.0.q").get_shape() == [9, rec["length"], 64]
