"""Unlearning: the objectives against their formulas, UCE's edit, the trainer's copy, masks, resume and errors,
on the embedded model and tiny SD 1.x / SDXL configurations."""

from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from pipelines.erasure import apply_erasure, load_erasure, read_metadata
from pipelines.loading import load_pipeline
from pipelines.training_process import DiffusionProcess
from pipelines.uce import erase_pairs, read_weight, replace_word, uce_edit
from pipelines.unlearn import (
    UnlearnSettings,
    checkpoint_path,
    erase,
    esd_target,
    parameter_group,
    unlearn,
    with_defaults,
)
from shapes.judge import read_objects
from tests.architectures import ARCHITECTURES, SD15_SCHEDULER
from xattn.controller import explicit_probs
from xattn.resteer import ConceptAttention, resteer_loss
from xattn.sites import Layer, Site

SHAPE_CONTEXTS = ("a red circle", "a blue circle", "a circle")
KEPT = ("a red square", "a blue triangle", "a green square", "a square", "a triangle")


@pytest.fixture(scope="module")
def pipe():
    p = load_pipeline(None)
    p.set_progress_bar_config(disable=True)
    return p


def draws(pipe, prompts, shape):
    images = pipe(prompts, num_inference_steps=25, guidance_scale=5.0, output_type="np",
                  generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images
    return [any(o.shape == shape for o in read_objects(np.rint(image * 255))) for image in images]


def test_esd_target_is_the_papers_and_the_2024_codes():
    e0, ec = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    assert torch.equal(esd_target(e0, ec, 1.0), torch.tensor([-1.0, -4.5]))  # e0 - (ec - e0)
    assert torch.allclose(esd_target(e0, ec, 1.0), ec - 2.0 * (ec - e0))  # the rewrite's eta = 2 with ec in front


def test_resteer_loss_is_the_norm_of_each_rows_own_concept_columns():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 6, 4, generator=g), torch.randn(2, 3, 6, 4, generator=g))
    columns = torch.zeros(2, 6, dtype=torch.bool)
    columns[0, 2], columns[1, 4] = True, True  # the concept sits at another token in each prompt
    capture = ConceptAttention(columns)
    site = Site(Layer("down.attn2", "cross", "down"), (1, 5), 0, 0.5)
    out = capture.attend(site, q, k, v, None)
    probs = explicit_probs(q, k, None, 0.5)
    assert torch.allclose(out, probs @ v)
    by_hand = torch.cat([probs[0, :, :, 2].flatten(), probs[1, :, :, 4].flatten()]).norm()
    assert torch.allclose(capture.take(), by_hand)
    # float32 sqrt is within an ulp of the correctly rounded root on some CPUs, not always equal to it
    assert torch.allclose(resteer_loss([torch.tensor([3.0]), torch.tensor([16.0])]), torch.tensor(np.sqrt(19.0), dtype=torch.float32), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="concept columns are"):
        capture.attend(site, q[:1], k[:1], v[:1], None)


def test_replace_word_keeps_other_words():
    assert replace_word("A red circle, and a circled circle", "circle", "square") == "A red square, and a circled square"
    assert replace_word("a red circle", "circle", "") == "a red"
    assert replace_word("a dark red circle", "dark red", "blue") == "a blue circle"


def test_uce_sends_the_concept_to_the_guide_and_keeps_the_rest(pipe):
    edited = uce_edit(pipe, "circle", list(SHAPE_CONTEXTS), list(KEPT), guide="square")
    assert sorted(edited) == sorted(n for n in parameter_group(pipe.unet, "esd-x-strict"))
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    inputs, guides = erase_pairs(pipe, "circle", "square", list(SHAPE_CONTEXTS))[name.removesuffix(".weight")]
    assert len(inputs) == len(guides) == 74 + 74 + 75  # from "circle" (token 3, or 2 in "a circle") to the 77th token
    before = dict(pipe.unet.named_parameters())[name].detach().double()
    after = edited[name].double()
    to_guide = (inputs @ after.T - guides @ before.T).norm() / (guides @ before.T).norm()
    was = (inputs @ before.T - guides @ before.T).norm() / (guides @ before.T).norm()
    assert to_guide < 0.4 * was  # a ridge solve against the preserved outputs, not an exact map
    with torch.no_grad():
        kept = pipe.encode_prompt(list(KEPT), "cpu", 1, False)[0].double().flatten(0, 1)
    assert ((kept @ after.T - kept @ before.T).norm() / (kept @ before.T).norm()) < 0.06  # 4 % measured
    with apply_erasure(pipe, edited):
        circles = draws(pipe, list(SHAPE_CONTEXTS), "circle")  # the edit's own contexts; other colours are the benchmark's
        squares = draws(pipe, ["a red square", "a purple square"], "square")
    assert torch.equal(dict(pipe.unet.named_parameters())[name], before.float())
    assert not any(circles) and all(squares)


def small(method, **changes):
    base = dict(method=method, concept="circle", guide="square", contexts=("a red circle",),
                preserve=("a red square",) if method in ("salun", "uce") else (),
                steps=4, batch=1, images_per_prompt=1, sample_steps=4, checkpoint_every=2)
    return UnlearnSettings(**{**base, **changes})


def test_training_changes_a_copy_and_resumes_exactly_after_a_stop(pipe, tmp_path):
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    whole = unlearn(pipe, small("fmn"), out=tmp_path / "whole", progress=False)
    assert whole.tensors and set(whole.tensors) <= set(parameter_group(pipe.unet, "esd-x"))
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())  # the pipeline keeps its weights
    unlearn(pipe, small("fmn", steps=2), out=tmp_path / "cut", progress=False)  # as if killed after the step-2 checkpoint
    assert torch.load(checkpoint_path(tmp_path / "cut", small("fmn")), weights_only=True)["step"] == 2
    resumed = unlearn(pipe, small("fmn"), out=tmp_path / "cut", progress=False)
    assert whole.tensors.keys() == resumed.tensors.keys()
    assert all(torch.equal(whole.tensors[n], resumed.tensors[n]) for n in whole.tensors)
    saved = (checkpoint_path(tmp_path / "cut", small("fmn"))).read_bytes()
    with pytest.raises(ValueError, match=r"checkpoint of other settings \(lr: "):
        unlearn(pipe, small("fmn", lr=0.5), out=tmp_path / "cut", progress=False)
    with pytest.raises(ValueError, match=r"has trained 4 steps, past the 2 asked; ask for --steps 4 or more"):
        unlearn(pipe, small("fmn", steps=2), out=tmp_path / "cut", progress=False)
    assert (checkpoint_path(tmp_path / "cut", small("fmn"))).read_bytes() == saved


class _Payload:
    """What a crafted checkpoint holds: unpickling it calls Path.touch(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_checkpoint_naming_python_objects_is_refused_and_runs_nothing(pipe, tmp_path):
    marker = tmp_path / "code-ran"
    (tmp_path / "out").mkdir()
    torch.save({"settings": _Payload(marker), "step": 0}, checkpoint_path(tmp_path / "out", small("fmn")))
    with pytest.raises(ValueError, match=r"not a checkpoint xattn can read safely: it names Python objects, which could run code; "
                                         r"it was not loaded. Delete it to start over, or write to another --out"):
        unlearn(pipe, small("fmn"), out=tmp_path / "out", progress=False)
    assert not marker.exists()
    (checkpoint_path(tmp_path / "out", small("fmn"))).write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match="not a checkpoint xattn can read safely: it is damaged or cut short"):
        unlearn(pipe, small("fmn"), out=tmp_path / "out", progress=False)


def test_fmn_trains_on_the_users_images(pipe):
    from shapes.scenes import make_scene

    from PIL import Image

    pictures = [Image.fromarray(make_scene(seed).image).resize((100, 80)) for seed in range(3)]  # any size: fitted
    result = unlearn(pipe, small("fmn", steps=2, contexts=("a circle",)), images=pictures, progress=False)
    assert result.tensors and np.isfinite(result.record["last_loss"])


def test_a_checkpoint_resumes_only_on_its_images_and_base_weights(pipe, tmp_path):
    from PIL import Image

    from shapes.scenes import make_scene

    pictures = [Image.fromarray(make_scene(seed).image) for seed in range(2)]
    settings = small("fmn", steps=2, contexts=("a circle",))
    unlearn(pipe, settings, out=tmp_path, images=pictures, progress=False)
    longer = small("fmn", steps=4, contexts=("a circle",))
    with pytest.raises(ValueError, match="trained on other images of the concept .*give the same --images"):
        unlearn(pipe, longer, out=tmp_path, images=pictures[::-1][:1], progress=False)
    with pytest.raises(ValueError, match="trained on other images of the concept"):
        unlearn(pipe, longer, out=tmp_path, progress=False)
    bias = pipe.unet.conv_out.bias.detach().clone()
    with torch.no_grad():
        pipe.unet.conv_out.bias.add_(1e-3)
    try:
        with pytest.raises(ValueError, match="trained from other base weights than this model's"):
            unlearn(pipe, longer, out=tmp_path, images=pictures, progress=False)
    finally:
        with torch.no_grad():
            pipe.unet.conv_out.bias.copy_(bias)
    assert unlearn(pipe, longer, out=tmp_path, images=pictures, progress=False).tensors


@pytest.mark.parametrize(("change", "message"), [
    ({"steps": -1}, r"--steps must be between 0 \(the method's default\) and 100000; got -1"),
    ({"lr": float("nan")}, r"--lr must be a finite number, 0 \(the method's default\) or more; got nan"),
    ({"seed": 2**70}, r"--seed must be between 0 and \d+; got 1180591620717411303424"),
])
def test_numbers_out_of_range_are_named(pipe, change, message):
    with pytest.raises(ValueError, match=message):
        unlearn(pipe, small("esd-x", **change), progress=False)


def test_esd_changes_only_its_group(pipe):
    result = unlearn(pipe, small("esd-x-strict", steps=2), progress=False)
    assert set(result.tensors) == set(parameter_group(pipe.unet, "esd-x-strict"))
    assert result.record["first_loss"] > 0


def test_salun_moves_only_the_salient_weights(pipe):
    result = unlearn(pipe, small("salun", steps=2, saliency=0.1, group="esd-x"), progress=False)
    params = dict(pipe.unet.named_parameters())
    moved = sum(int((value != params[n]).sum()) for n, value in result.tensors.items())
    total = sum(p.numel() for p in parameter_group(pipe.unet, "esd-x").values())
    assert 0 < moved <= 0.1 * total + 1


def test_erase_writes_a_file_that_loads_and_drops_the_checkpoint(pipe, tmp_path):
    path = erase(pipe, small("esd-x", steps=2), tmp_path, model="embedded")
    assert path.name == "erase-circle-esd-x.safetensors" and not checkpoint_path(tmp_path, small("esd-x")).exists()
    metadata = read_metadata(path)
    assert metadata["method"] == "esd-x" and metadata["concept"] == "circle" and '"model": "embedded"' in metadata["settings"]
    erasure = load_erasure(pipe, path)
    erasure.remove()


def test_bad_input_is_named(pipe, tmp_path):
    with pytest.raises(ValueError, match=r"'zxqvw' is not a word of the tokenizer's vocabulary"):
        unlearn(pipe, small("uce", concept="zxqvw"))
    with pytest.raises(ValueError, match="'circle' is not a word of the prompt 'a red square'"):
        unlearn(pipe, small("uce", contexts=("a red square",)))
    with pytest.raises(ValueError, match="SalUn needs prompts to retain"):
        unlearn(pipe, small("salun", preserve=()))
    with pytest.raises(ValueError, match="unknown unlearning method 'esd'"):
        unlearn(pipe, small("esd"))
    with pytest.raises(ValueError, match="esd-x keeps no preserved prompts"):
        unlearn(pipe, small("esd-x", preserve=("a red square",)))
    with pytest.raises(ValueError, match="uce trains on prompts alone"):
        unlearn(pipe, small("uce"), images=[np.zeros((64, 64, 3), np.uint8)])


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_methods_run_on_sd_architectures(arch):
    pipe = ARCHITECTURES[arch]()
    pipe.set_progress_bar_config(disable=True)
    settings = dict(contexts=("a photo of a cat",), guide="dog", concept="cat")
    edited = unlearn(pipe, small("uce", preserve=("a photo of a dog",), **settings)).tensors
    assert edited and all(".attn2.to_" in n for n in edited)
    for method in ("esd-x", "fmn", "salun"):
        kept = ("a photo of a dog",) if method == "salun" else ()
        trained = unlearn(pipe, small(method, steps=1, preserve=kept, **settings), progress=False)
        assert trained.tensors, method


def test_training_noise_is_the_models_forward_process_whatever_the_sampler():
    euler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x, t, target = DiffusionProcess(euler, 4).noised(latents, torch.Generator().manual_seed(1))
    again = torch.Generator().manual_seed(1)
    assert torch.equal(t, torch.randint(0, 1000, (3,), generator=again))
    noise = torch.randn(latents.shape, generator=again)
    alpha = DDPMScheduler.from_config(SD15_SCHEDULER).alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(x, alpha.sqrt() * latents + (1 - alpha).sqrt() * noise, atol=1e-6)
    assert (x - latents).abs().amin() > 0  # Euler's add_noise at these t would hand back the clean latents
    assert torch.equal(target, noise)
    v = DDPMScheduler.from_config(SD15_SCHEDULER, prediction_type="v_prediction")
    assert torch.allclose(DiffusionProcess(v, 4).noised(latents, torch.Generator().manual_seed(1))[2],
                          alpha.sqrt() * noise - (1 - alpha).sqrt() * latents, atol=1e-6)


@pytest.mark.parametrize("method", ["esd-x", "fmn", "salun"])
def test_training_does_not_depend_on_the_pipelines_sampler(method):
    settings = small(method, steps=2, contexts=("a photo of a cat",), guide="dog", concept="cat",
                     preserve=("a photo of a dog",) if method == "salun" else ())
    results = []
    for scheduler in (DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        pipe = ARCHITECTURES["sd1"]()
        pipe.scheduler = scheduler.from_config(SD15_SCHEDULER)
        results.append(unlearn(pipe, settings, progress=False).tensors)
    assert results[0] and all(r.keys() == results[0].keys() for r in results)
    assert all(torch.equal(r[n], results[0][n]) for r in results for n in r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pipelines_train_in_float32_and_get_their_dtype_back(dtype):
    pipe = ARCHITECTURES["sd1"]().to(dtype=dtype)
    settings = dict(contexts=("a photo of a cat",), guide="dog", concept="cat")
    for method in ("esd-x", "fmn"):
        tensors = unlearn(pipe, small(method, steps=2, **settings), progress=False).tensors
        assert tensors and all(t.dtype == dtype and torch.isfinite(t).all() for t in tensors.values()), method


def test_a_diverging_run_stops_with_a_clear_error(pipe, tmp_path):
    with pytest.raises(ValueError, match=r"the loss is (nan|inf).*Lower the learning rate"):
        unlearn(pipe, small("esd-x", steps=6, lr=1e30), out=tmp_path, progress=False)


def test_uce_under_lora_solves_on_what_the_layer_applies():
    from tests.architectures import add_lora

    pipe = ARCHITECTURES["sd1"]()
    add_lora(pipe)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    layer = pipe.unet.get_submodule(name)
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    assert torch.allclose(read_weight(layer), layer.base_layer.weight + delta, atol=1e-6)
    edited = uce_edit(pipe, "cat", ["a photo of a cat"], ["a red square"], guide="dog")
    assert f"{name}.weight" in edited and all(".base_layer" not in n and ".lora_" not in n for n in edited)
    with torch.no_grad():
        cat, dog, kept = pipe.encode_prompt(["a photo of a cat", "a photo of a dog", "a red square"], "cpu", 1, False)[0]
        before = {"cat": layer(cat), "dog": layer(dog), "kept": layer(kept)}
        with apply_erasure(pipe, edited):
            assert torch.allclose(read_weight(layer), edited[f"{name}.weight"] + delta, atol=1e-5)  # base edited, adapter as it was
            after = {"cat": layer(cat), "kept": layer(kept)}
    assert (after["cat"] - before["dog"]).norm() < 0.75 * (before["cat"] - before["dog"]).norm()  # the concept's keys go toward the guide's
    assert (after["kept"] - before["kept"]).norm() < (after["cat"] - before["cat"]).norm()


def test_defaults_on_the_embedded_model_name_the_worlds_captions_and_keep_the_rest():
    circle = with_defaults(UnlearnSettings(method="uce", concept="circle"), "embedded")
    assert circle.contexts == ("a red circle", "a yellow circle", "a green circle", "a blue circle", "a purple circle")
    assert "a blue square" in circle.preserve and len(circle.preserve) == 10 and not any("circle" in p for p in circle.preserve)
    red = with_defaults(UnlearnSettings(method="salun", concept="red", guide="blue"), "embedded")
    assert red.contexts == ("a red circle", "a red square", "a red triangle") and len(red.preserve) == 12
    assert with_defaults(UnlearnSettings(method="esd-x", concept="circle", guide="square"), "embedded").preserve == ()
    mine = with_defaults(UnlearnSettings(method="uce", concept="dog", contexts=("a dog",), preserve=("a cat",)), "embedded")
    assert (mine.contexts, mine.preserve) == (("a dog",), ("a cat",))
    elsewhere = with_defaults(UnlearnSettings(method="uce", concept="dog"), "runwayml/stable-diffusion-v1-5")
    assert elsewhere.contexts == () and "a photo of a cat" in elsewhere.preserve and not any("dog" in p for p in elsewhere.preserve)
    with pytest.raises(ValueError, match=r"on the embedded model ESD needs --guide, what 'circle' turns into \(e.g. --guide square\)"):
        with_defaults(UnlearnSettings(method="esd-x", concept="circle"), "embedded")


def test_salun_kv_is_salun_on_keys_and_values_with_its_measured_settings():
    kv = UnlearnSettings(method="salun-kv", concept="red", guide="blue").resolved()
    assert (kv.method, kv.group, kv.lr, kv.retain_weight, kv.steps) == ("salun", "esd-x-strict", 3e-3, 1.0, 100)
    mine = UnlearnSettings(method="salun-kv", concept="red", guide="blue", lr=1e-3, retain_weight=0.7).resolved()
    assert (mine.lr, mine.retain_weight) == (1e-3, 0.7)


def test_erasures_of_different_names_share_an_output_folder(pipe, tmp_path):
    unlearn(pipe, small("fmn", steps=2), out=tmp_path, progress=False)  # a run cut short: its checkpoint stays
    path = erase(pipe, small("esd-x", concept="red", guide="blue", contexts=("a red square",), steps=2), tmp_path, model="embedded")
    assert path.name == "erase-red-esd-x.safetensors"
    assert torch.load(checkpoint_path(tmp_path, small("fmn")), weights_only=True)["step"] == 2
    resumed = unlearn(pipe, small("fmn"), out=tmp_path, progress=False)
    assert resumed.record["settings"]["steps"] == 4
