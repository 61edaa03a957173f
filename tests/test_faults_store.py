"""Fault cases of the capture store (issue 16): each failed silently before, each is refused now.

Sections: store (manifest integrity, schema, tensor dtype/shape), paths (file names in the
manifest, pickle-free model loading), locks (two captures into one directory).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hla_analysis._io import exclusive_output_lock
from hla_analysis.capture import capture, load_capture
from hla_analysis.capture.manifest import sealed
from hla_analysis.capture.store import tensor_sha256


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "cap"
    return capture("minilm", out=out, num_inputs=2, max_tokens=12, progress=False)


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _edit(path, change, *, reseal):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    if reseal:
        manifest = sealed(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


# -- store -------------------------------------------------------------------------------
def test_edited_manifest_scale_is_refused(small, tmp_path):
    path = _copy(small, tmp_path)

    def rescale(m):
        for layer in m["layers"]:
            layer["scale"] *= 4

    _edit(path, rescale, reseal=False)
    with pytest.raises(ValueError, match="modified after the capture wrote it"):
        load_capture(path)


def test_manifest_missing_a_key_is_a_one_line_error(small, tmp_path):
    path = _copy(small, tmp_path)
    _edit(path, lambda m: m.pop("num_heads"), reseal=True)
    with pytest.raises(ValueError, match="lacks the field 'num_heads'"):
        load_capture(path)
    path2 = tmp_path / "c2"
    shutil.copytree(small, path2)
    _edit(path2, lambda m: m["layers"][0].pop("scale"), reseal=True)
    with pytest.raises(ValueError, match="layer 0 lacks the field 'scale'"):
        load_capture(path2)


def _swap_first_heads(m):
    m["kv_head_for_query_head"][:2] = m["kv_head_for_query_head"][1::-1]


def _rescale_layer(m):
    m["layers"][1]["scale"] *= 1.0001


def _retype_layer_masks(m):
    for layer in m["layers"]:
        layer["mask"] = "causal"


@pytest.mark.parametrize("change, field", [
    (_swap_first_heads, "kv_head_for_query_head is not h // 1 for 12 query heads over 12 key/value heads "
                        "(query head 0 -> 1)"),
    (_rescale_layer, "layer 1 scale is"),
    (lambda m: m.update(scale=m["scale"] * 2), ": scale is"),
    (lambda m: m.update(causal=True), "causal is True but the layers' masks say False"),
    (lambda m: m["layers"][0].update(mask="sliding"), "layer 0 mask is 'sliding'"),
    (_retype_layer_masks, "causal is False but the layers' masks say True"),
    (lambda m: m.update(lengths=[m["lengths"][0], m["lengths"][1] - 1]), "lengths disagree"),
])
def test_resealed_edit_of_a_derived_field_is_refused(small, tmp_path, change, field):
    path = _copy(small, tmp_path)
    _edit(path, change, reseal=True)
    with pytest.raises(ValueError, match="the manifest was edited") as info:
        load_capture(path)
    assert field in str(info.value) and "\n" not in str(info.value)


def test_scale_within_float_rounding_still_loads(small, tmp_path):
    path = _copy(small, tmp_path)

    def nudge(m):
        m["scale"] *= 1 + 1e-15
        for layer in m["layers"]:
            layer["scale"] *= 1 - 1e-15

    _edit(path, nudge, reseal=True)
    assert load_capture(path).num_layers == 6
    path2 = tmp_path / "c2"
    shutil.copytree(small, path2)
    _edit(path2, lambda m: m["layers"][5].update(scale=m["layers"][5]["scale"] * (1 + 1e-9)), reseal=True)
    with pytest.raises(ValueError, match="layer 5 scale is .*the manifest was edited"):
        load_capture(path2)


def test_forged_tensor_dtype_and_shape_are_refused_even_with_recomputed_hashes(small, tmp_path):
    from safetensors.torch import load_file, save_file

    for forged_key, forge in (("layer.0.q", lambda t: t.to(torch.int32)), ("layer.1.k", lambda t: t[:, :-1])):
        path = tmp_path / forged_key
        shutil.copytree(small, path)
        file = path / "input_00000.safetensors"
        tensors = load_file(str(file))
        tensors[forged_key] = forge(tensors[forged_key]).contiguous()
        save_file(tensors, str(file))

        def rehash(m, tensors=tensors, file=file):
            import hashlib

            rec = m["inputs"][0]
            rec["tensor_sha256"] = {k: tensor_sha256(t) for k, t in tensors.items()}
            rec["bytes"] = file.stat().st_size
            rec["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()

        _edit(path, rehash, reseal=True)
        cap = load_capture(path)
        layer = int(forged_key.split(".")[1])
        with pytest.raises(ValueError, match="manifest says"):
            cap.get(layer, 0)


# -- paths -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../other/input_00000.safetensors", "/etc/passwd", "..", "sub/x.safetensors"])
def test_file_names_outside_the_capture_are_refused(small, tmp_path, name):
    path = _copy(small, tmp_path)
    _edit(path, lambda m: m["inputs"][0].__setitem__("file", name), reseal=True)
    with pytest.raises(ValueError, match="not a plain file name"):
        load_capture(path)


def test_a_file_given_as_the_capture_directory_is_named(small, tmp_path, capsys):
    from hla_analysis.cli import main as cli_main

    manifest = small / "manifest.json"
    with pytest.raises(ValueError, match="is a file; pass the folder that holds the capture") as info:
        load_capture(manifest)
    assert "does not exist" not in str(info.value) and str(small) in str(info.value)
    capsys.readouterr()
    assert cli_main(["compare", "--capture", str(manifest), "--variants", "softmax", "--out",
                     str(tmp_path / "r.csv"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "is a file" in err and "does not exist" not in err and err.count("\n") == 1


def test_a_symlinked_manifest_is_refused(small, tmp_path, capsys):
    """A manifest.json that is a link (here to a copy of the capture's own, so every hash agrees) is
    not read: the error names the link and the fix, in one line, from Python and the CLI alike."""
    import os

    from hla_analysis.cli import main as cli_main

    path = _copy(small, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (path / "manifest.json").rename(elsewhere / "manifest.json")
    os.symlink(elsewhere / "manifest.json", path / "manifest.json")
    with pytest.raises(ValueError, match="manifest.json is a symbolic link .*copy the real file into the folder") \
            as info:
        load_capture(path)
    assert str(path / "manifest.json") in str(info.value) and "\n" not in str(info.value)
    capsys.readouterr()
    assert cli_main(["compare", "--capture", str(path), "--variants", "softmax", "--out", str(tmp_path / "r.csv"),
                     "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "symbolic link" in err and "Traceback" not in err and err.count("\n") == 1
    # a dangling link is named as a link too, not as a folder without a manifest
    (path / "manifest.json").unlink()
    os.symlink(tmp_path / "nowhere.json", path / "manifest.json")
    with pytest.raises(ValueError, match="is a symbolic link"):
        load_capture(path)
    # an unfinished capture's manifest.partial.json (what resume reads) is refused the same way
    (path / "manifest.json").unlink()
    os.symlink(elsewhere / "manifest.json", path / "manifest.partial.json")
    with pytest.raises(ValueError, match="manifest.partial.json is a symbolic link"):
        load_capture(path)


def test_an_input_file_linking_outside_the_capture_is_refused(small, tmp_path):
    """An input file that is a link out of the folder is refused on load and again when it is opened
    (a link made after loading), naming the file and the fix."""
    import os

    path = _copy(small, tmp_path)
    outside = tmp_path / "outside.safetensors"
    (path / "input_00001.safetensors").rename(outside)
    os.symlink(outside, path / "input_00001.safetensors")
    with pytest.raises(ValueError, match="'input_00001.safetensors' is a link that resolves outside the capture "
                                         "directory .*copy the real file into the folder"):
        load_capture(path)
    path2 = _copy(small, tmp_path / "b")
    cap = load_capture(path2)
    (path2 / "input_00000.safetensors").rename(tmp_path / "outside0.safetensors")
    os.symlink(tmp_path / "outside0.safetensors", path2 / "input_00000.safetensors")
    with pytest.raises(ValueError, match="resolves outside the capture directory .*copy the real file"):
        cap.get(0, 0)
    with pytest.raises(ValueError, match="resolves outside the capture directory"):
        cap.verify()


def test_capture_does_not_open_a_linked_input_file_to_resume(small, tmp_path, monkeypatch):
    """A folder whose only entry is a link named like an input file is not taken for an interrupted
    capture (which would open the link's target to read its metadata): it is refused as foreign."""
    import os

    import hla_analysis.capture.run as run

    out = tmp_path / "out"
    out.mkdir()
    os.symlink(small / "input_00000.safetensors", out / "input_00000.safetensors")
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="already holds files that are not part of a capture "
                                         r"\(input_00000.safetensors\)"):
        capture("minilm", out=out, num_inputs=1, max_tokens=8, progress=False)


def test_pickle_only_model_folder_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "model"
    net = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               vocab_size=50))
    net.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(net.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no .safetensors weights.*unpickled"):
        capture(str(folder), inputs=[{"input_ids": torch.tensor([[1, 2, 3]])}], out=tmp_path / "c", progress=False)


# -- locks -------------------------------------------------------------------------------
def test_second_capture_into_a_locked_directory_is_refused(tmp_path):
    out = tmp_path / "cap"
    with exclusive_output_lock(out, command="capture"):
        with pytest.raises(ValueError, match="another hla-analysis process is writing"):
            capture("minilm", out=out, num_inputs=1, max_tokens=8, progress=False)
    assert not (out / "manifest.json").exists()
    load_capture(capture("minilm", out=out, num_inputs=1, max_tokens=8, progress=False))  # free again
