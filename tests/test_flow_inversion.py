"""Real images on flow-matching pipelines (issue 31): the rectified flow inverted by Euler and FireFlow, the direct
correction, and edits of the inverted image, on tiny random SD3 and Flux pipelines built like the real ones."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from editors.blend import LocalBlend
from editors.specs import Swap
from pipelines.ddim import guided_output
from pipelines.edit import prompt_to_prompt
from pipelines.flow import FireFlowScheduler, FlowLevel, euler_invert, fireflow_invert, flow_levels, pipeline_sigmas
from pipelines.flowedit import FlowEditSettings, flow_edit
from pipelines.images import image_to_latent
from pipelines.inversion import invert, reconstruct
from tests.architectures import TRANSFORMERS, sd1
from tests.test_cli import xattn as run_cli
from xattn.conditioning import denoiser_output, encode_text
from xattn.families import cross_grids, pipeline_latents, spatial_latents

FLOWS = ["sd3", "flux"]
_BUILT: dict = {}


def built(name: str):
    if name not in _BUILT:
        _BUILT[name] = TRANSFORMERS[name]()
    return _BUILT[name]


def picture() -> Image.Image:
    """32x48 px: a red disc left of centre on grey, a blue bar on the right."""
    y, x = np.mgrid[:32, :48]
    array = np.full((32, 48, 3), 128, np.uint8)
    array[(y - 16) ** 2 + (x - 14) ** 2 < 64] = (220, 30, 30)
    array[6:26, 34:42] = (30, 40, 210)
    return Image.fromarray(array)


def levels(sigmas: list[float]) -> list[FlowLevel]:
    return [FlowLevel(1000 * a, a, b) for a, b in zip(sigmas, sigmas[1:])]


def test_one_inverted_step_of_either_solver_by_hand():
    constant = levels([1.0, 0.25, 0.0])  # a constant velocity: both solvers are exact
    path = euler_invert(lambda x, t: torch.full_like(x, 2.0), torch.zeros(1, 1, 1, 1), constant)
    assert path.flatten().tolist() == [0.0, 0.5, 2.0]
    assert fireflow_invert(lambda x, t: torch.full_like(x, 2.0), torch.zeros(1, 1, 1, 1), constant).flatten().tolist() == [0.0, 0.5, 2.0]
    seen = []
    field = lambda x, t: seen.append(t) or x  # noqa: E731  dx/dsigma = x
    fireflow = fireflow_invert(field, torch.ones(1, 1, 1, 1), levels([1.0, 0.5, 0.0]))
    # from 1 at sigma 0: v(1) = 1 at the start; midpoint 1.25 at sigma 0.25 gives 1.625 at 0.5; then midpoint 1.625 +
    # 0.25 * 1.25 = 1.9375 at 0.75, and 1.625 + 0.5 * 1.9375 = 2.59375 at 1
    assert fireflow.flatten().tolist() == [1.0, 1.625, 2.59375]
    assert seen == [0.0, 250.0, 750.0]  # one call a step, and one at the start


@pytest.mark.parametrize("solver, order", [(euler_invert, 1), (fireflow_invert, 2)])
def test_the_solvers_converge_at_their_order(solver, order):
    """dx/dsigma = x cos(sigma), x(1) = x(0) exp(sin 1): halving the steps' size divides the error by 2^order."""
    field = lambda x, t: x * np.cos(t / 1000)  # noqa: E731
    errors = []
    for steps in (16, 32, 64):
        end = solver(field, torch.ones(1, 1, 1, 1, dtype=torch.float64), levels(np.linspace(1, 0, steps + 1).tolist()))[-1]
        errors.append(abs(end.item() - np.exp(np.sin(1.0))))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(abs(r - 2**order) < 0.25 * 2**order for r in ratios), (errors, ratios)


@pytest.mark.parametrize("name", FLOWS)
def test_inversion_levels_are_the_ones_the_pipeline_samples_at(name):
    pipe = built(name)
    seen = []
    pipe("a red circle", num_inference_steps=4, guidance_scale=2.0, height=32, width=48, sigmas=pipeline_sigmas(4),
         output_type="latent", callback_on_step_end=lambda p, i, t, tensors: seen.append(float(t)) or {})
    grid = cross_grids(pipe, (16, 24))[0]
    planned = flow_levels(pipe.scheduler, 4, grid[0] * grid[1], pipeline_sigmas(4))
    assert seen == pytest.approx([level.timestep for level in planned], abs=1e-3)
    assert planned[0].sigma == pytest.approx(1.0) and planned[-1].sigma_next == 0.0
    assert all(a.sigma_next == b.sigma for a, b in zip(planned, planned[1:]))


@pytest.mark.parametrize("name", FLOWS)
def test_direct_redraws_the_image_latent_exactly_and_edits_change_it(name, tmp_path):
    pipe = built(name)
    inversion = invert(pipe, picture(), "a red circle", steps=4, guidance=3.0, height=32, width=48, cache_dir=tmp_path)
    encoded = image_to_latent(pipe, inversion.image)
    assert inversion.latents.shape == (5, *encoded.shape[1:])
    assert torch.equal(inversion.latents[0], encoded[0])
    redrawn = spatial_latents(pipe, reconstruct(pipe, inversion, output_type="latent")[None], (16, 24))
    assert (redrawn - encoded).abs().max() < 1e-5
    result = prompt_to_prompt(pipe, ["a red circle", "a red square"], Swap(), steps=4, guidance=3.0, inversion=inversion,
                              output_type="latent", self_steps=0.5)
    source, target = (spatial_latents(pipe, image[None], (16, 24)) for image in result.images)
    assert (source - encoded).abs().max() < 1e-5
    assert (target - source).abs().max() > 1e-3
    assert invert(pipe, picture(), "a red circle", steps=4, guidance=3.0, height=32, width=48, cache_dir=tmp_path).seconds == 0  # cached


def drift(method: str, steps: int) -> float:
    pipe = built("sd3")
    inversion = invert(pipe, picture(), "a red circle", method=method, steps=steps, guidance=1.0, height=32, width=48, cache_dir=None)
    return (reconstruct(pipe, inversion, output_type="latent")[None] - image_to_latent(pipe, inversion.image)).abs().mean().item()


def test_without_a_correction_the_redraw_drifts_less_with_more_steps_and_less_with_fireflow():
    euler = [drift("euler", steps) for steps in (5, 20)]
    fireflow = [drift("fireflow", steps) for steps in (5, 20)]
    assert euler[1] < euler[0] / 2 and fireflow[1] < fireflow[0] / 2, (euler, fireflow)
    assert fireflow[0] < euler[0] and fireflow[1] < euler[1], (euler, fireflow)


@pytest.mark.parametrize("name", FLOWS)
def test_the_fireflow_scheduler_in_a_pipeline_takes_fireflow_steps(name):
    """The pipeline's own loop with FireFlowScheduler equals FireFlow written out: a call at the start, then one at each
    step's midpoint, whose velocity also starts the next step."""
    pipe = built(name)
    start = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(1))
    own = pipe.scheduler
    pipe.scheduler = FireFlowScheduler.from_config(own.config)
    try:
        out = pipe("a red circle", num_inference_steps=3, guidance_scale=1.0, height=32, width=48, sigmas=pipeline_sigmas(3),
                   latents=pipeline_latents(pipe, start), output_type="latent").images
    finally:
        pipe.scheduler = own
    cond, _ = encode_text(pipe, ["a red circle"], (32, 48))
    velocity = lambda x, t: denoiser_output(pipe, x, t, cond, guidance=1.0)  # noqa: E731
    planned = flow_levels(own, 3, 96, pipeline_sigmas(3))
    with torch.no_grad():
        x, moving = start, velocity(start, planned[0].timestep)
        for level in planned:
            half = (level.sigma_next - level.sigma) / 2
            moving = velocity(x + half * moving, (level.sigma + half) * 1000)
            x = x + 2 * half * moving
    assert (spatial_latents(pipe, out, (16, 24)) - x).abs().max() < 1e-5


def test_blending_is_refused_on_a_fireflow_inversion():
    pipe = built("sd3")
    inversion = invert(pipe, picture(), "a red circle", method="fireflow", steps=2, height=32, width=48, cache_dir=None)
    with pytest.raises(ValueError, match="FireFlow's sampler keeps to itself"):
        prompt_to_prompt(pipe, ["a red circle", "a red square"], steps=2, inversion=inversion, blend=LocalBlend(["circle"], ["square"]))


def test_methods_are_refused_where_the_sampler_cannot_use_them():
    with pytest.raises(ValueError, match="samples a rectified flow: invert it with one of direct, euler, fireflow, not null-text"):
        invert(built("sd3"), picture(), "a red circle", method="null-text", cache_dir=None)
    with pytest.raises(ValueError, match="samples a diffusion: invert it with one of direct, null-text, .*, not euler"):
        invert(sd1(), picture(), "a red circle", method="euler", cache_dir=None)
    with pytest.raises(ValueError, match="PixArtAlphaPipeline lets a step callback change only the latents"):
        invert(built("pixart"), picture(), "a red circle", method="null-text", cache_dir=None, height=32, width=48)


def test_the_invert_and_edit_commands_take_a_flow_model(tmp_path):
    built("sd3").save_pretrained(tmp_path / "model")
    picture().save(tmp_path / "photo.png")
    model = ["--model", str(tmp_path / "model"), "--steps", "3", "--cache", str(tmp_path / "cache")]
    result = run_cli("invert", "--image", str(tmp_path / "photo.png"), "a red circle", *model, "--out", str(tmp_path / "inv"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "inv" / "reconstruction.png").exists()
    result = run_cli("edit", "--image", str(tmp_path / "photo.png"), "a red circle", "a red square", *model,
                     "--out", str(tmp_path / "edit"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "edit" / "target.png").exists()


def test_flowedit_keeps_the_image_when_the_prompts_and_scales_agree_and_edits_when_they_differ():
    pipe = built("sd3")
    same = FlowEditSettings(steps=4, n_max=3, source_guidance=4.0, target_guidance=4.0)
    kept = flow_edit(pipe, picture(), "a red circle", "a red circle", settings=same, height=32, width=48, output_type="latent")
    assert (kept.images[1] - kept.images[0]).abs().max() < 1e-5  # z + x_t - x is x_t up to rounding
    edited = flow_edit(pipe, picture(), "a red circle", "a blue square", settings=same, height=32, width=48, output_type="latent")
    assert torch.isfinite(edited.images[1]).all() and (edited.images[1] - edited.images[0]).abs().max() > 1e-3
    untouched = flow_edit(pipe, picture(), "a red circle", "a blue square", settings=replace(same, n_max=0), height=32, width=48,
                          output_type="latent")
    assert torch.equal(untouched.images[1], untouched.images[0])


@pytest.mark.parametrize("name", FLOWS)
def test_one_flowedit_step_by_hand(name):
    """Two levels, n_max 1: only the last level runs; z = x + (0 - sigma) (V_tar(x_t) - V_src(x_t)) with
    x_t = (1 - sigma) x + sigma noise, each velocity guided at its own prompt's scale."""
    pipe = built(name)
    settings = FlowEditSettings(steps=2, n_max=1, source_guidance=2.0, target_guidance=6.0)
    result = flow_edit(pipe, picture(), "a red circle", "a blue square", settings=settings, seed=5, height=32, width=48,
                       output_type="latent")
    x = result.images[0][None]
    sigmas = pipeline_sigmas(2) if name == "flux" else None
    level = flow_levels(pipe.scheduler, 2, 96, sigmas)[1]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    x_t = (1 - level.sigma) * x + level.sigma * noise
    (src, src_un), (tar, tar_un) = (encode_text(pipe, [p], (32, 48)) for p in ("a red circle", "a blue square"))
    delta = guided_output(pipe, x_t, level.timestep, tar, tar_un, 6.0) - guided_output(pipe, x_t, level.timestep, src, src_un, 2.0)
    assert (result.images[1][None] - (x - level.sigma * delta)).abs().max() < 1e-5


def test_flowedit_refuses_a_diffusion_model_and_impossible_settings():
    with pytest.raises(ValueError, match="FlowEdit edits flow-matching models"):
        flow_edit(sd1(), picture(), "a red circle", "a red square")
    with pytest.raises(ValueError, match="n_min <= n_max <= steps"):
        flow_edit(built("sd3"), picture(), "a red circle", "a red square", settings=FlowEditSettings(steps=10, n_max=20))


def test_the_flowedit_command(tmp_path):
    built("flux").save_pretrained(tmp_path / "model")
    picture().save(tmp_path / "photo.png")
    result = run_cli("flowedit", "a red circle", "a red square", "--image", str(tmp_path / "photo.png"), "--model", str(tmp_path / "model"),
                     "--steps", "3", "--n-max", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"input.png", "target.png", "side-by-side.png"}
    result = run_cli("flowedit", "a red circle", "a red square", "--image", str(tmp_path / "photo.png"), "--model", str(tmp_path / "model"),
                     "--steps", "3", "--n-max", "5", "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and "n_min <= n_max <= steps" in result.stderr


def test_a_batch_flowedit_job_runs_on_a_flow_model_and_is_checked_before(tmp_path):
    built("sd3").save_pretrained(tmp_path / "model")
    picture().save(tmp_path / "photo.png")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(f'{{"kind": "flowedit", "image": "{tmp_path / "photo.png"}", "source": "a red circle", "target": "a red square", '
                    '"steps": 3, "n_max": 2, "id": "fe"}\n'
                    f'{{"kind": "flowedit", "image": "{tmp_path / "photo.png"}", "source": "a red circle", "target": "a red square", '
                    '"steps": 3, "n_max": 9, "id": "bad"}\n')
    result = run_cli("batch", str(jobs), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and "n_min <= n_max <= steps" in result.stdout + result.stderr
    assert {p.name for p in (tmp_path / "out").rglob("*.png")} == {"input.png", "target.png"}
