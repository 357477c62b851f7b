"""Prompt-to-Prompt on transformer denoisers (issue 31): PixArt-alpha's DiT cross-attention through the UNet's code,
SD3/SD3.5 and Flux through the joint-attention edits, on tiny random pipelines built like the real ones."""

import numpy as np
import pytest
import torch

from editors.blend import LocalBlend
from editors.specs import Refine, Reweight, Swap
from pipelines.edit import prompt_to_prompt
from pipelines.erasure import read_metadata
from tests.architectures import TRANSFORMERS
from tests.test_cli import xattn as run_cli
from ui.app import Handlers
from xattn.families import spatial_latents

FAMILIES = ["pixart", "sd3", "sd3-no-t5", "sd3.5", "flux"]
_BUILT: dict = {}


def built(name: str):
    if name not in _BUILT:
        _BUILT[name] = TRANSFORMERS[name]()
    return _BUILT[name]


def edit(name, prompts, edit_spec=None, **options):
    """Three steps at 32x48 px (an 8x12 token grid; PixArt's T5 encodes 120 tokens of 512, SD3's CLIP 77 then T5's)."""
    if name == "pixart":
        options["use_resolution_binning"] = False
    options.setdefault("self_steps", 0.5)
    options.setdefault("output_type", "np")
    return prompt_to_prompt(built(name), prompts, edit_spec, steps=3, height=32, width=48, **options)


def images(name, prompts, edit_spec=None, **options) -> np.ndarray:
    return np.stack(edit(name, prompts, edit_spec, **options).images)


CASES = {
    "swap": (["a red circle", "a red square"], Swap()),
    "refine": (["a red circle", "a big red circle"], Refine()),
    "reweight": (["a red circle", "a red circle"], Reweight({"red": 5.0})),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", FAMILIES)
def test_edits_run_fused_as_their_explicit_reference(name, case):
    prompts, spec = CASES[case]
    fused = images(name, prompts, spec)
    explicit = images(name, prompts, spec, explicit=True)
    assert np.isfinite(fused).all()
    assert np.abs(fused - explicit).max() <= 1e-5
    assert np.abs(fused[1] - fused[0]).max() > 1e-4  # the edit did something


@pytest.mark.parametrize("name", FAMILIES)
def test_the_source_is_plain_generation_and_an_identity_edit_changes_nothing(name):
    options = {"use_resolution_binning": False} if name == "pixart" else {}
    plain = built(name)("a red circle", num_inference_steps=3, guidance_scale=5.0, height=32, width=48, generator=torch.Generator().manual_seed(0),
                        output_type="np", **options).images[0]
    made = images(name, ["a red circle", "a red circle"], Swap())
    assert np.abs(made[0] - plain).max() <= 1e-5
    assert np.abs(made[1] - made[0]).max() <= 1e-5


@pytest.mark.parametrize("name", ["pixart", "sd3"])
def test_self_attention_injection_reaches_a_transformers_token_grid(name):
    """Every layer works at the token grid, coarser than a quarter of the latent: the default injects there (on SD3,
    into the image x image block of the joint softmax)."""
    prompts, spec = CASES["swap"]
    injected, alone = images(name, prompts, spec, self_steps=1.0), images(name, prompts, spec, self_steps=0)
    assert np.abs(injected[1] - alone[1]).max() > 1e-4  # not a no-op (the tiny models change little)
    assert np.abs(injected[1] - injected[0]).mean() < np.abs(alone[1] - alone[0]).mean()


@pytest.mark.parametrize("name", ["pixart", "sd3", "flux"])
def test_local_blend_keeps_the_source_outside_its_region(name):
    """A user mask over the left half: the right half of the latents stays the source's (Flux's are unpacked to
    blend and packed again)."""
    prompts, spec = CASES["swap"]
    mask = np.zeros((32, 48))
    mask[:, :24] = 1
    pipe = built(name)
    latent = (32 // pipe.vae_scale_factor, 48 // pipe.vae_scale_factor)
    made = spatial_latents(pipe, torch.stack(edit(name, prompts, spec, blend=LocalBlend(mask=mask, start=0), output_type="latent").images), latent)
    change = (made[1] - made[0]).abs()
    assert change[..., latent[1] // 2 :].max() == 0 < change[..., : latent[1] // 2].max()


@pytest.mark.parametrize("name", ["pixart", "sd3", "flux"])
def test_maps_and_word_blending_read_the_edited_attention(name):
    prompts, spec = CASES["swap"]
    result = edit(name, prompts, spec, maps=True, blend=LocalBlend(["circle"], ["square"]))
    made = np.stack(result.images)
    assert np.isfinite(made).all() and np.abs(made[1] - made[0]).max() > 1e-3
    target = result.maps.word_maps(image=1)
    assert "square" in target and np.isfinite(target["square"]).all() and target["square"].max() > 0


def test_the_edit_command_and_a_batch_edit_job_take_a_transformer_model(tmp_path):
    built("sd3").save_pretrained(tmp_path / "model")
    result = run_cli("edit", "a red circle", "a red square", "--model", str(tmp_path / "model"), "--steps", "2",
                     "--blend", "circle", "square", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "replace" in result.stderr and (tmp_path / "out" / "target.png").exists()
    result = run_cli("edit", "a red circle", "a red square", "--model", str(tmp_path / "model"), "--steps", "2",
                     "--joint-edit", "projection", "--out", str(tmp_path / "projected"))
    assert result.returncode == 0, result.stderr
    (tmp_path / "jobs.jsonl").write_text('{"kind": "edit", "source": "a red circle", "target": "a blue circle", "steps": 2, "id": "j"}\n')
    result = run_cli("batch", str(tmp_path / "jobs.jsonl"), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "batch"))
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "batch").rglob("*.png"))) >= 2


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_the_input_projection_edit_acts_in_its_window_only(name):
    """Shin et al.'s edit: with self_steps 0 the target is its own prompt's plain image, over every step another one;
    explicit and fused agree; a target alike to its source is the source."""
    prompts = ["a red circle", "a red square"]
    plain = images(name, [prompts[1], prompts[1]], Swap())[0]
    outside = images(name, prompts, Swap(), joint_edit="projection", self_steps=0)
    assert np.abs(outside[1] - plain).max() <= 1e-5
    inside = images(name, prompts, Swap(), joint_edit="projection", self_steps=1.0)
    assert np.abs(inside - images(name, prompts, Swap(), joint_edit="projection", self_steps=1.0, explicit=True)).max() <= 1e-5
    assert np.abs(inside[1] - plain).max() > 1e-4
    same = images(name, [prompts[0], prompts[0]], Swap(), joint_edit="projection", self_steps=1.0)
    assert np.abs(same[1] - same[0]).max() <= 1e-5


def test_the_input_projection_edit_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="joint attention"):
        edit("pixart", ["a red circle", "a red square"], Swap(), joint_edit="projection")
    with pytest.raises(ValueError, match="re-weighting"):
        edit("sd3", ["a red circle", "a red circle"], Reweight({"red": 2.0}), joint_edit="projection")
    with pytest.raises(ValueError, match="joint_edit is one of"):
        edit("sd3", ["a red circle", "a red square"], Swap(), joint_edit="swap")


def test_joint_blocks_limit_the_edit_to_the_chosen_blocks():
    """Flux: editing no block at all leaves the target its own prompt's plain image; a block that does not exist is
    named with the ones that do."""
    prompts = ["a red circle", "a red square"]
    plain = images("flux", [prompts[1], prompts[1]], Swap())[0]
    none = images("flux", prompts, Swap(), joint_blocks={"double": [], "single": []})
    assert np.abs(none[1] - plain).max() <= 1e-5
    some = images("flux", prompts, Swap(), joint_blocks={"single": [0]})
    assert np.abs(some[1] - plain).max() > 1e-5 and np.abs(some[1] - images("flux", prompts, Swap())[1]).max() > 1e-5
    with pytest.raises(ValueError, match=r"double: 0-\d+, single: 0-\d+"):
        edit("flux", prompts, Swap(), joint_blocks={"double": [99]})


def test_the_apps_real_image_compose_and_erase_tabs_take_a_flow_model():
    handlers = Handlers(built("sd3"), "tiny")
    photo = handlers.pipe("a red circle", num_inference_steps=2).images[0]
    sheet, gallery, said = handlers.real_image(photo, "a red circle", "fireflow", "", "a red square", "auto", {}, "", "0.8", "0.4", 2, 5.0)
    assert said == "edit: replace (word swap)" and len(gallery) == 6 and sheet.size[0] > 2 * sheet.size[1]
    sheet, gallery, said = handlers.real_image(photo, "a red circle", "flowedit", "", "a red square", "auto", {}, "", "0.8", "0.4", 2, 5.0)
    assert said.startswith("edit: FlowEdit, the authors' settings (50 levels, the last 33 edited") and gallery == []
    sheet, gallery = handlers.compose("a red circle and a blue square", ["circle", "square"], "astar", 0, 2, 5.0)
    assert [label for _, label in gallery] == ["circle", "square"]
    before, after, path = handlers.erase("circle", "uce", "square", "square", 0, "a red circle", 0)
    assert read_metadata(path)["method"] == "uce" and before.size == after.size


def test_the_apps_edit_tab_takes_a_transformer_model():
    handlers = Handlers(built("sd3"), "tiny")
    sheet, gallery, said = handlers.edit("a red circle", "a red square", "auto", {}, "circle, square", "0.8", "0.4", 0, 2, 5.0)
    assert said == "edit: replace (word swap)" and sheet.size[0] > sheet.size[1]
    assert [label for _, label in gallery] == ["source: a", "source: red", "source: circle", "target: a", "target: red", "target: square"]
