"""Inputs a capture cannot use are refused up front, before the model runs, with one line naming them.

Before, each of these reached the model: NaN/Inf surfaced as a softmax mismatch blamed on
soft-capping, a bad modules= pattern as "forward failed", an empty input_ids as torch's
reshape error, and an all-zero attention mask gave a capture of uniform attention to nothing.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hla_analysis.capture import capture  # noqa: E402
from hla_analysis.cli import main as cli_main  # noqa: E402


def _vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              image_size=32, patch_size=8, attn_implementation="eager")).eval()


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=100, max_position_embeddings=64, attn_implementation="eager")).eval()


def _forward_calls(net) -> list:
    calls = []
    net.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_float_input_is_refused_before_the_model_runs(tmp_path, bad):
    net = _vit()
    calls = _forward_calls(net)
    good = torch.randn(1, 3, 32, 32)
    x = torch.randn(1, 3, 32, 32)
    x[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"^input 1 \(pixel_values of 'inputs\[1\]'\) contains NaN or Inf; "
                                         r"pass finite values") as info:
        capture(net, inputs=[{"pixel_values": good}, {"pixel_values": x}], out=tmp_path / "c", progress=False)
    assert "\n" not in str(info.value) and "soft-capping" not in str(info.value)
    assert calls == [] and not (tmp_path / "c").exists()


def test_nan_in_a_float_attention_mask_is_refused_and_integer_tensors_pass(tmp_path):
    net = _bert()
    ids = torch.randint(3, 100, (1, 6))
    mask = torch.ones(1, 6)
    mask[0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"input 0 \(attention_mask of 'inputs\[0\]'\) contains NaN"):
        capture(net, inputs=[{"input_ids": ids, "attention_mask": mask}], out=tmp_path / "a", progress=False)
    # integer tensors and a float 0/1 mask are fine
    path = capture(net, inputs=[{"input_ids": ids, "attention_mask": torch.ones(1, 6)}], out=tmp_path / "b",
                   progress=False)
    assert (path / "manifest.json").is_file()


def test_cli_inputs_file_with_inf_names_the_input(tmp_path, capsys):
    from safetensors.torch import save_file

    folder = tmp_path / "vit"
    _vit().save_pretrained(folder)
    px = torch.randn(3, 3, 32, 32)
    px[2, 0, 0, 0] = float("inf")
    save_file({"pixel_values": px}, str(tmp_path / "px.safetensors"))
    capsys.readouterr()
    assert cli_main(["capture", "--model", str(folder), "--inputs", str(tmp_path / "px.safetensors"),
                     "--out", str(tmp_path / "c"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "input 2 (pixel_values of 'px.safetensors[2]') contains NaN or Inf" in err and err.count("\n") == 1


def test_invalid_modules_pattern_is_refused_before_loading_anything(tmp_path):
    # a model folder that does not exist: the pattern is checked before any model is loaded
    with pytest.raises(ValueError, match=r"^modules='\(' is not a valid regular expression") as info:
        capture(str(tmp_path / "no_such_model"), out=tmp_path / "c", modules="(", progress=False)
    assert "forward failed" not in str(info.value) and "\n" not in str(info.value)
    net = _vit()
    calls = _forward_calls(net)
    with pytest.raises(ValueError, match=r"^modules='\[' is not a valid regular expression"):
        capture(net, inputs=[{"pixel_values": torch.randn(1, 3, 32, 32)}], out=tmp_path / "d", modules="[",
                progress=False)
    with pytest.raises(ValueError, match="modules must be a regular expression string"):
        capture(net, inputs=[{"pixel_values": torch.randn(1, 3, 32, 32)}], out=tmp_path / "e", modules=3,
                progress=False)
    assert calls == []


def test_zero_length_input_ids_is_refused_up_front(tmp_path):
    net = _bert()
    calls = _forward_calls(net)
    with pytest.raises(ValueError, match=r"^input 0 has 0 tokens \(input_ids of 'inputs\[0\]' has shape \[1, 0\]\)"):
        capture(net, inputs=[{"input_ids": torch.zeros(1, 0, dtype=torch.long)}], out=tmp_path / "c", progress=False)
    assert calls == []
    vit = _vit()
    calls = _forward_calls(vit)
    with pytest.raises(ValueError, match=r"input 0 \(pixel_values of 'inputs\[0\]'\) is empty \(shape \[1, 3, 0, 0\]"):
        capture(vit, inputs=[{"pixel_values": torch.zeros(1, 3, 0, 0)}], out=tmp_path / "d", progress=False)
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.long, torch.bool, torch.float32])
def test_all_zero_attention_mask_is_refused_up_front(tmp_path, dtype):
    net = _bert()
    calls = _forward_calls(net)
    ids = torch.randint(3, 100, (2, 5))
    mask = torch.ones(2, 5, dtype=dtype)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"^input 1 \(attention_mask of 'inputs\[0\]\[1\]'\) is all zero, leaving no "
                                         r"position to attend to"):
        capture(net, inputs=[{"input_ids": ids, "attention_mask": mask}], out=tmp_path / "c", progress=False)
    assert calls == [] and not (tmp_path / "c").exists()


def test_bad_input_values_are_refused_before_the_model_loads(tmp_path, capsys):
    """A NaN in --inputs is named before the model is looked for: the model folder here does not
    exist, and the error is about the input, not the model."""
    from safetensors.torch import save_file

    pixels = torch.zeros(1, 3, 32, 32)
    pixels[0, 1, 2, 3] = float("nan")
    save_file({"pixel_values": pixels}, str(tmp_path / "in.safetensors"))
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="input 0 .*contains NaN or Inf"):
        capture(missing, out=tmp_path / "cap", inputs=str(tmp_path / "in.safetensors"), progress=False)
    code = cli_main(["capture", "--model", missing, "--inputs", str(tmp_path / "in.safetensors"),
                     "--out", str(tmp_path / "cap2")])
    err = capsys.readouterr().err
    assert code == 1 and "NaN or Inf" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cap").exists() and not (tmp_path / "cap2").exists()


def test_capture_removes_only_its_own_temporary_files(tmp_path):
    """A user's dot-file ending in .tmp in --out is not capture's to delete; capture's own stale
    temporary files (a run killed mid-write) are."""
    out = tmp_path / "cap"
    out.mkdir()
    mine = out / ".my-draft.tmp"
    mine.write_text("mine")
    stale = out / ".input_00000.safetensors.abc123.tmp"
    stale.write_text("half a file")
    capture(_vit(), out=out, inputs=[{"pixel_values": torch.randn(1, 3, 32, 32)}], progress=False)
    assert mine.read_text() == "mine" and not stale.exists()


def test_a_folder_given_as_inputs_is_named_as_a_folder(tmp_path):
    with pytest.raises(ValueError, match="is a folder; pass one .safetensors file"):
        capture(_vit(), out=tmp_path / "cap", inputs=str(tmp_path), progress=False)
    assert not (tmp_path / "cap").exists()
