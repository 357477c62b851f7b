"""Erasure files: only changed tensors, applied in place, removable, refused on other weights."""

import pytest
import torch
from safetensors.torch import save_file

from pipelines.erasure import FORMAT, load_erasure, read_metadata, save_erasure
from pipelines.inversion_cache import model_fingerprint
from pipelines.loading import load_pipeline
from pipelines.unlearn import parameter_group


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(None)


def test_parameter_groups_follow_diffusers_names(pipe):
    strict = parameter_group(pipe.unet, "esd-x-strict")
    cross = parameter_group(pipe.unet, "esd-x")
    rest = parameter_group(pipe.unet, "esd-u")
    assert strict and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in strict)
    assert set(strict) < set(cross) and all(".attn2." in n for n in cross)
    assert any(n.endswith("attn2.to_out.0.bias") for n in cross)
    assert not set(cross) & set(rest) and "conv_in.weight" in rest
    with pytest.raises(ValueError, match="unknown parameter group"):
        parameter_group(pipe.unet, "everything")


def test_save_load_remove(pipe, tmp_path):
    name = next(iter(parameter_group(pipe.unet, "esd-x-strict")))
    params = dict(pipe.unet.named_parameters())
    original = params[name].detach().clone()
    base = model_fingerprint(pipe)
    path = save_erasure(tmp_path / "e.safetensors", {name: original + 1}, method="esd", concept="circle", base=base, settings={"eta": 1.0})
    assert read_metadata(path)["concept"] == "circle"
    erasure = load_erasure(pipe, path)
    assert torch.equal(params[name], original + 1)
    with pytest.raises(ValueError, match="from other base weights"):
        load_erasure(pipe, path)  # the model now carries the erasure: its weights are not the base's
    erasure.remove()
    assert torch.equal(params[name], original) and model_fingerprint(pipe) == base


def test_foreign_files_are_refused(pipe, tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an xattn erasure file"):
        load_erasure(pipe, tmp_path / "plain.safetensors")


def test_a_file_that_fails_on_its_last_tensor_leaves_the_model_as_it_was(pipe, tmp_path):
    names = list(parameter_group(pipe.unet, "esd-x-strict"))[:3]
    params = dict(pipe.unet.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    tensors = {n: params[n].detach() + 1 for n in names}
    tensors[names[-1]] = torch.zeros(3, 3)
    path = save_erasure(tmp_path / "e.safetensors", tensors, method="esd", concept="circle", base=model_fingerprint(pipe), settings={})
    with pytest.raises(ValueError, match=f"the erasure's {names[-1]} is \\(3, 3\\) but the denoiser's is"):
        load_erasure(pipe, path)
    assert all(torch.equal(p, before[n]) for n, p in params.items())


def test_a_file_without_its_metadata_is_refused_by_name(pipe, tmp_path):
    name = next(iter(parameter_group(pipe.unet, "esd-x-strict")))
    save_file({name: torch.zeros(1)}, str(tmp_path / "bare.safetensors"), metadata={"format": FORMAT, "concept": "circle"})
    with pytest.raises(ValueError, match="lacks the erasure metadata method, base; it is damaged or hand-made"):
        load_erasure(pipe, tmp_path / "bare.safetensors")


@pytest.mark.parametrize(("change", "message"), [
    (lambda w: torch.full_like(w, float("nan")), "holds non-finite values; it is damaged"),
    (lambda w: w * 1e6, r"holds values up to .* where the denoiser's reach .*; no unlearning method moves weights that far"),
    (lambda w: w.to(torch.int64), "is int64, not floating point; it is damaged or hand-made"),
])
def test_damaged_values_are_refused_before_anything_changes(pipe, tmp_path, change, message):
    name = next(iter(parameter_group(pipe.unet, "esd-x-strict")))
    params = dict(pipe.unet.named_parameters())
    original = params[name].detach().clone()
    path = save_erasure(tmp_path / "e.safetensors", {name: change(original)}, method="esd", concept="circle",
                        base=model_fingerprint(pipe), settings={})
    with pytest.raises(ValueError, match=message):
        load_erasure(pipe, path)
    assert torch.equal(params[name], original)
