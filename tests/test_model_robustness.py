"""Capture, swap and evaluate on architectures that do more than plain softmax attention.

Each test builds a tiny random-weight model from a transformers config class (hidden 32-64,
2-3 layers, <= 24 tokens) and checks that what the toolkit cannot reproduce is refused with
a one-line ValueError naming the cause, and that what it can is numbered and swapped right.
"""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hla_analysis.capture import capture, load_capture  # noqa: E402
from hla_analysis.swap import swap_attention  # noqa: E402

# float32 through a few width-64 layers: some hundred ulps of the activations' magnitude
# (as in tests/test_swap.py)
EPS = torch.finfo(torch.float32).eps


def _tol(reference: torch.Tensor) -> float:
    return 128 * EPS * float(reference.abs().max())


def _ids(batch=1, n=16, vocab=200, seed=0):
    return torch.randint(3, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def _gemma2():
    config = transformers.Gemma2Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, initializer_range=0.3,
        attn_logit_softcapping=5.0, final_logit_softcapping=None, sliding_window=4096, query_pre_attn_scalar=16,
        attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(config).eval()


def _gpt2():
    config = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     initializer_range=0.3, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def _albert():
    config = transformers.AlbertConfig(vocab_size=200, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                       num_attention_heads=4, intermediate_size=64, initializer_range=0.3,
                                       attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.AlbertModel(config).eval()


def _bart():
    config = transformers.BartConfig(
        vocab_size=200, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        init_std=0.3, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.BartModel(config).eval()


def _left_padded(n=24, pad=4):
    mask = torch.ones(1, n, dtype=torch.long)
    mask[0, :pad] = 0
    return {"input_ids": _ids(n=n, vocab=300), "attention_mask": mask}


# 1. the probability check on inputs with fully masked query rows


def test_capture_check_covers_left_padded_inputs(tmp_path):
    """A left-padded row has no allowed key; it is skipped, not allowed to turn the check off."""
    gemma = _gemma2()
    with pytest.raises(ValueError, match=r"softcap=5\.0") as plain:
        capture(gemma, inputs=[{"input_ids": _ids(n=24, vocab=300)}], out=tmp_path / "g", progress=False)
    with pytest.raises(ValueError, match=r"softcap=5\.0") as padded:
        capture(gemma, inputs=[_left_padded()], out=tmp_path / "gp", progress=False)
    assert "\n" not in str(plain.value) and "\n" not in str(padded.value)

    cap = load_capture(capture(_gpt2(), inputs=[_left_padded()], out=tmp_path / "p", progress=False))
    error = cap.manifest["max_abs_prob_error"]
    assert math.isfinite(error) and 0 <= error <= 1e-4
    assert all(math.isfinite(rec["max_abs_prob_error"]) for rec in cap.manifest["inputs"])
    assert cap.get(0, 0)["attention_mask"][:4].sum() == 0  # the padded rows are stored, fully masked


# 2. arguments of the attention function that swap does not implement


def test_swap_refuses_softcap_and_position_bias(tmp_path):
    gemma = _gemma2()
    with torch.no_grad(), pytest.raises(ValueError, match=r"softcap=5\.0 is not supported by swap_attention"):
        with swap_attention(gemma, "softmax"):
            gemma(input_ids=_ids(n=12, vocab=300), use_cache=False)
    t5 = transformers.T5Model(transformers.T5Config(
        vocab_size=200, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, attn_implementation="eager"))
    encoder = t5.get_encoder().eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"layer 0 \(.*\): position_bias \(a \[") as error:
        with swap_attention(encoder, "softmax", layers=[0]):
            encoder(input_ids=_ids())
    assert "\n" not in str(error.value)
    # capture names the argument too, not "soft-capping or attention sinks"
    with pytest.raises(ValueError, match=r"passes position_bias"):
        capture(encoder, inputs=[{"input_ids": _ids()}], out=tmp_path / "t5", progress=False)


def test_swap_refuses_short_sliding_window_and_training_dropout():
    config = transformers.MistralConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        sliding_window=8, attn_implementation="eager")
    mistral = transformers.MistralForCausalLM(config).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"layer 1 \(model\.layers\.1\.self_attn\): "
                                                          r"sliding_window=8"):
        with swap_attention(mistral, "softmax", layers=[1]):
            mistral(input_ids=_ids(), use_cache=False)
    # a window longer than the input cuts nothing: the swap reproduces the model
    ids = _ids(n=8)
    with torch.no_grad():
        before = mistral(input_ids=ids, use_cache=False).logits
        with swap_attention(mistral, "softmax"):
            after = mistral(input_ids=ids, use_cache=False).logits
    assert float((before - after).abs().max()) <= _tol(before)

    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        attention_probs_dropout_prob=0.1, attn_implementation="eager")).train()
    with pytest.raises(ValueError, match=r"dropout=0\.1 in training mode .* model\.eval\(\)"):
        with swap_attention(bert, "softmax"):
            bert(input_ids=_ids())


# 3. a module shared by several layers


def test_albert_shared_module_swapped_per_call(tmp_path):
    albert = _albert()
    ids = _ids()
    outputs = {}
    with torch.no_grad():
        ref = albert(input_ids=ids).last_hidden_state
        for layers in ([0], [1], [2], [0, 1, 2], "all"):
            with swap_attention(albert, "hla:m=2,phi=affine", layers=layers) as session:
                outputs[str(layers)] = albert(input_ids=ids).last_hidden_state
            assert sorted(session.counts) == ([0, 1, 2] if layers == "all" else layers)
            assert all(c.calls == 1 for c in session.counts.values())
        with swap_attention(albert, "softmax") as session:
            same = albert(input_ids=ids).last_hidden_state
    assert len(session.modules) == 3 and len(set(session.modules)) == 1
    tol = _tol(ref)
    assert float((same - ref).abs().max()) <= tol
    for layers in ("[0]", "[1]", "[2]"):
        assert float((outputs[layers] - ref).abs().max()) > 1e3 * tol  # each layer alone changes the output
    assert float((outputs["[0]"] - outputs["all"]).abs().max()) > 1e3 * tol
    assert torch.equal(outputs["[0, 1, 2]"], outputs["all"])
    # capture numbers the same calls
    cap = load_capture(capture(albert, inputs=[{"input_ids": ids}], out=tmp_path / "a", progress=False))
    assert cap.num_layers == 3 and [l["name"] for l in cap.manifest["layers"]] == session.modules


# 4. evaluate on a capture of some modules only


def test_evaluate_maps_module_subset_to_its_layer(tmp_path):
    from hla_analysis.capture.models import load_model
    from hla_analysis.evaluate import run_model_evaluation
    from hla_analysis.fit import FitConfig

    tokenizer = load_model("minilm").tokenizer
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, initializer_range=0.3))
    folder = tmp_path / "bert"
    bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    variants = ["hla:m=2,phi=affine"]
    results = tmp_path / "r.parquet"  # evaluate reads only the comparison's settings beside it
    (tmp_path / "r.settings.json").write_text(json.dumps(
        {"fit": FitConfig().as_dict(), "variants": variants, "train_inputs": 1}))
    tables = {}
    for tag, modules in (("all", None), ("one", r"layer\.1\.")):
        cap = capture(str(folder), out=tmp_path / tag, num_inputs=3, max_tokens=16, modules=modules, progress=False)
        tables[tag] = run_model_evaluation(str(folder), capture=cap, results=results, out=tmp_path / f"{tag}.csv",
                                           variants=variants, progress=False)

    def single(table, layer):
        rows = table[(table.swap_mode == "single") & (table.layer == layer)]
        return rows.sort_values(["metric", "input"]).reset_index(drop=True)

    full, one = single(tables["all"], 1), single(tables["one"], 0)
    assert set(one.module) == {"encoder.layer.1.attention.self"} == set(full.module)
    assert list(one.metric) == list(full.metric) and list(one.input) == list(full.input)
    # the same swap on the same inputs: the same numbers, and not those of layer 0
    assert (one.value - full.value).abs().max() <= 1e-12
    other = single(tables["all"], 0)
    cosine = (one.metric == "embedding_cosine") & (one.input >= 0)
    assert (one.value[cosine] - other.value[cosine]).abs().max() > 1e-6


def test_capture_layer_names_must_match_model():
    from hla_analysis.evaluate import capture_layer_calls

    assert capture_layer_calls(["layers.1.a", "layers.1.a"], ["m.layers.0.a", "m.layers.1.a", "m.layers.1.a"]) \
        == [1, 2]
    with pytest.raises(ValueError, match=r"capture layer 0 \(decoder\.x\) matches none"):
        capture_layer_calls(["decoder.x"], ["encoder.x"])


# 5. encoder-decoder models and cross-attention


def test_encoder_decoder_swap_counts_self_attention_and_refuses_cross():
    bart = _bart()
    inputs = {"input_ids": _ids(), "decoder_input_ids": _ids(n=6, seed=1), "use_cache": False}
    with torch.no_grad():
        ref = bart(**inputs).last_hidden_state
        with pytest.raises(ValueError, match=r"decoder\.layers\.0\.encoder_attn is cross-attention .*"
                                             r"model\.get_encoder\(\)"):
            with swap_attention(bart, "softmax"):
                bart(**inputs)
        with swap_attention(bart, "softmax", layers=[0, 1, 2, 3]) as session:
            same = bart(**inputs).last_hidden_state
        assert session.modules == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn",
                                   "decoder.layers.0.self_attn", "decoder.layers.1.self_attn"]
        assert float((same - ref).abs().max()) <= _tol(ref)
        with swap_attention(bart, "hla:m=2,phi=affine", layers=[3]) as session:
            changed = bart(**inputs).last_hidden_state  # the decoder's last self-attention, not the encoder's
        assert sorted(session.counts) == [3] and float((changed - ref).abs().max()) > 1e3 * _tol(ref)
        with pytest.raises(ValueError, match=r"layers \[4\] are out of range: BartModel made 4 self-attention"):
            with swap_attention(bart, "softmax", layers=[4]):
                bart(**inputs)


def test_capture_refuses_cross_attention_of_equal_length(tmp_path):
    config = transformers.WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=10, max_target_positions=32,
        vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, init_std=0.3,
        attn_implementation="eager")
    whisper = transformers.WhisperModel(config).eval()
    inputs = [{"input_features": torch.randn(1, 16, 20, generator=torch.Generator().manual_seed(0)),
               "decoder_input_ids": _ids(n=10, vocab=100)}]  # 10 decoder tokens, 10 encoder frames
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.encoder_attn is cross-attention"):
        capture(whisper, inputs=inputs, out=tmp_path / "w", progress=False)
    cap = load_capture(capture(whisper, inputs=inputs, out=tmp_path / "ws", modules="self_attn", progress=False))
    assert cap.num_layers == 4 and not any("encoder_attn" in l["name"] for l in cap.manifest["layers"])


# 6. models whose attention swap cannot reach


def test_swap_unknown_attention_is_a_value_error():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 32)
            self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, input_ids):
            x = self.embed(input_ids)
            return self.attn(x, x, x)[0]

    net = Tiny().eval()
    with pytest.raises(ValueError, match="holds no transformers config"):
        with swap_attention(net, "softmax"):
            pass
    net.config = transformers.BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1)
    with torch.no_grad(), pytest.raises(ValueError, match="made no attention call through transformers"):
        with swap_attention(net, "softmax"):
            net(_ids(n=6, vocab=50))


# 7. evaluate needs a text capture


def test_evaluate_refuses_tensor_capture(tmp_path):
    from hla_analysis.evaluate import run_model_evaluation
    from hla_analysis.fit import FitConfig

    vit = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=8, attn_implementation="eager")).eval()
    cap = capture(vit, inputs=[{"pixel_values": torch.randn(2, 3, 16, 16)}], out=tmp_path / "v", progress=False)
    (tmp_path / "r.settings.json").write_text(json.dumps(
        {"fit": FitConfig().as_dict(), "variants": ["softmax"], "train_inputs": 1}))
    with pytest.raises(ValueError, match="needs a text capture"):
        run_model_evaluation("minilm", capture=cap, results=tmp_path / "r.parquet", out=tmp_path / "e.csv",
                             variants=["softmax"], progress=False)


def test_swap_with_cache_is_not_mistaken_for_cross_attention():
    """A decode step (1 query, 9 keys) is self-attention: it is numbered, and refused for its cache."""
    gpt2 = _gpt2()
    ids = _ids(n=9, vocab=300)
    with torch.no_grad():
        cache = gpt2(input_ids=ids[:, :8], use_cache=True).past_key_values
        with pytest.raises(ValueError, match=r"\(got 1 queries, 9 keys: a cache.*use_cache=False"):
            with swap_attention(gpt2, "softmax"):
                gpt2(input_ids=ids[:, 8:], cache=cache, use_cache=True)


# 7. arguments transformers passes down that do not change the attention; DETR-style models


def test_swap_runs_with_output_hidden_states_and_return_dict():
    """Model-level flags reach the attention function: they change nothing there and must not be refused."""
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        initializer_range=0.3)).eval()
    ids = _ids()
    with torch.no_grad():
        ref = bert(input_ids=ids, output_hidden_states=True, return_dict=True)
        with swap_attention(bert, "softmax") as session:
            out = bert(input_ids=ids, output_hidden_states=True, return_dict=True)
    assert sorted(session.counts) == [0, 1]
    for a, b in zip(ref.hidden_states, out.hidden_states):
        assert float((a - b).abs().max()) <= _tol(a)


def _detr():
    config = transformers.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                  out_features=["stage2"]),
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10)
    torch.manual_seed(0)
    return transformers.DetrModel(config).eval()  # default attention implementation (sdpa), as users build it


def test_detr_encoder_captures_and_swap_restores_the_default_implementation(tmp_path):
    """An encoder-decoder whose decoder runs on learned queries takes pixel_values alone; swapping into
    a model built with the default implementation restores it without touching its backbone."""
    detr = _detr()
    before = detr.config._attn_implementation
    pixels = [{"pixel_values": torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(i))}
              for i in range(2)]
    with torch.no_grad():
        ref = detr(**pixels[0]).last_hidden_state
        with swap_attention(detr, "softmax", layers=[0, 1]) as session:
            out = detr(**pixels[0]).last_hidden_state
    assert session.modules[:2] == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    assert sorted(session.counts) == [0, 1]
    assert float((out - ref).abs().max()) <= _tol(ref) and detr.config._attn_implementation == before
    with pytest.raises(ValueError, match="layers of one length: record them separately with modules="):
        capture(detr, inputs=pixels, out=tmp_path / "all", progress=False)
    cap = load_capture(capture(detr, inputs=pixels, out=tmp_path / "enc", modules=r"encoder\.layers", progress=False))
    assert cap.num_layers == 2 and cap.manifest["lengths"] == [64, 64]
