"""Real-image inversion: the DDIM step and its inverse against the scheduler, each method's defining
property on real pipelines, editing an inverted image, the content-keyed cache, and image input."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from PIL import Image

from editors import LocalBlend, Refine, Reweight, Swap
from pipelines.ddim import ddim_coefficients, ddim_levels
from pipelines.edit import prompt_to_prompt
from pipelines.images import image_to_latent, latent_to_image, prepare_image, psnr
from benchmarks.hostile_input import png_header
from pipelines.dpl import DPLSettings
from pipelines.inversion import DIFFUSION_METHODS, NullTextSettings, invert, reconstruct
from pipelines.loading import load_pipeline
from shapes.scenes import make_scene
from tests.architectures import ARCHITECTURES

SCENE = make_scene(7_000_002)  # "a blue circle above a yellow circle", a seed the model never trained on


def assert_same_picture(array: np.ndarray, image: Image.Image) -> None:
    """A float image in [0, 1] and an 8-bit one are the same picture (rounding apart: batches of other sizes differ in the last float bits)."""
    assert np.abs(array * 255 - np.asarray(image, dtype=np.float32)).max() <= 0.5 + 1e-3


@pytest.fixture(scope="module")
def shapes_pipe():
    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_is_the_schedulers_and_inverts_exactly(prediction):
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction,
                              rescale_betas_zero_snr=prediction == "v_prediction", timestep_spacing="trailing", clip_sample=False,
                              set_alpha_to_one=False)
    torch.manual_seed(0)
    x, out = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for level in ddim_levels(scheduler, 10):
        if level.alpha == 0 and prediction != "v_prediction":
            continue
        c_x, c_out = ddim_coefficients(level.alpha, level.alpha_next, prediction)
        stepped = scheduler.step(out, level.timestep, x).prev_sample
        assert torch.allclose(c_x * x + c_out * out, stepped, atol=1e-5)
        assert torch.allclose((stepped - c_out * out) / c_x, x, atol=1e-4)


def test_ddim_coefficients_by_hand():
    # epsilon from alpha-bar 0.25 to 0.64: x0 = (x - 0.866 eps) / 0.5, x' = 0.8 x0 + 0.6 eps
    assert ddim_coefficients(0.25, 0.64, "epsilon") == pytest.approx((1.6, 0.6 - 0.8 * 0.75**0.5 / 0.5))
    # v-prediction is a rotation by the angle between the levels: (cos, sin) of (phi_to - phi_from)
    assert ddim_coefficients(0.0, 0.64, "v_prediction") == pytest.approx((0.6, -0.8))
    with pytest.raises(ValueError, match="prediction type"):
        ddim_coefficients(0.5, 0.6, "flow")


def test_direct_inversion_redraws_the_vae_round_trip_exactly(shapes_pipe):
    inversion = invert(shapes_pipe, SCENE.image, SCENE.caption, method="direct", steps=10, cache_dir=None)
    assert inversion.latents.shape == (11, 4, 16, 16)
    vae_only = np.asarray(latent_to_image(shapes_pipe, image_to_latent(shapes_pipe, Image.fromarray(SCENE.image))))
    assert np.array_equal(np.asarray(reconstruct(shapes_pipe, inversion)), vae_only)


def test_negative_prompt_inversion_samples_the_conditional_prediction(shapes_pipe):
    inversion = invert(shapes_pipe, SCENE.image, SCENE.caption, method="negative-prompt", steps=10, cache_dir=None)
    redrawn = reconstruct(shapes_pipe, inversion, output_type="np")
    unguided = shapes_pipe(SCENE.caption, num_inference_steps=10, guidance_scale=1.0, latents=inversion.start, output_type="np").images[0]
    assert np.abs(redrawn - unguided).max() < 1e-5


def test_null_text_optimisation_reconstructs_better_than_plain_ddim(shapes_pipe):
    scores = {}
    for method in ("ddim", "null-text"):
        inversion = invert(shapes_pipe, SCENE.image, SCENE.caption, method=method, steps=10, cache_dir=None)
        scores[method] = psnr(reconstruct(shapes_pipe, inversion), SCENE.image)
    assert inversion.nulls.shape == (10, 77, shapes_pipe.text_encoder.config.hidden_size)
    assert scores["null-text"] > scores["ddim"] + 2, scores  # 2 dB: a 37 % smaller squared error


def test_editing_an_inverted_image(shapes_pipe):
    inversion = invert(shapes_pipe, SCENE.image, SCENE.caption, steps=10, cache_dir=None)
    target = SCENE.caption.replace("blue circle", "blue square")
    refined = SCENE.caption.replace("yellow circle", "small yellow circle")
    prompts = [SCENE.caption, target, SCENE.caption, refined, SCENE.caption]
    edits = [Swap(), Swap(), Refine(), Reweight({"yellow": 3.0})]
    source, edited, unchanged, *others = prompt_to_prompt(shapes_pipe, prompts, edits, steps=10, inversion=inversion,
                                                          blend=LocalBlend(["circle"], []), output_type="np").images
    assert target != SCENE.caption
    assert_same_picture(source, reconstruct(shapes_pipe, inversion))
    assert np.abs(unchanged - source).max() < 1e-5  # every row gets the source's correction
    assert np.abs(edited - source).max() > 0.2
    assert all(np.abs(other - source).max() > 0.02 for other in others)


def test_edit_checks_the_inversion_it_is_given(shapes_pipe):
    inversion = invert(shapes_pipe, SCENE.image, SCENE.caption, method="null-text", steps=2, guidance=5.0,
                       null_text=NullTextSettings(inner_steps=1), cache_dir=None)
    target = SCENE.caption.replace("blue", "red")
    with pytest.raises(ValueError, match="must be the caption the image was inverted with"):
        prompt_to_prompt(shapes_pipe, ["a red circle", target], steps=2, inversion=inversion)
    with pytest.raises(ValueError, match="inverted for 2 steps"):
        prompt_to_prompt(shapes_pipe, [SCENE.caption, target], steps=3, inversion=inversion)
    with pytest.raises(ValueError, match="optimised for guidance 5"):
        prompt_to_prompt(shapes_pipe, [SCENE.caption, target], steps=2, guidance=7.5, inversion=inversion)
    with pytest.raises(ValueError, match="unknown inversion method 'nti'"):
        invert(shapes_pipe, SCENE.image, SCENE.caption, method="nti")


@pytest.mark.parametrize("name", ["sd1", "sd2-v", "sdxl"])
@pytest.mark.parametrize("method", DIFFUSION_METHODS)
def test_every_method_edits_on_every_architecture(name, method):
    pipe = ARCHITECTURES[name]()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler = pipe.scheduler
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    options = {}
    if method.startswith("dpl"):
        options = {"nouns": ["circle"], "masks": {"circle": np.arange(32)[:, None] < 16 + np.zeros((1, 32))}, "dpl": DPLSettings(inner_steps=2)}
        if name == "sdxl":
            with pytest.raises(ValueError, match="dpl inversion runs on one text encoder"):
                invert(pipe, image, "a red circle", method=method, steps=3, cache_dir=None, **options)
            return
    inversion = invert(pipe, image, "a red circle", method=method, steps=3, null_text=NullTextSettings(inner_steps=2), cache_dir=None,
                       **options)
    assert inversion.notes == ["centre-cropped 48x40 to 40x40", "resized 40x40 to the model's 32x32"]
    source, edited = prompt_to_prompt(pipe, ["a red circle", "a red square"], steps=3, inversion=inversion, output_type="np").images
    assert np.isfinite(edited).all() and np.abs(edited - source).max() > 0
    assert pipe.scheduler is scheduler
    if method == "direct":
        assert_same_picture(source, latent_to_image(pipe, inversion.latents[:1]))


def test_cache_is_keyed_by_image_caption_model_and_settings(shapes_pipe, tmp_path):
    def run(image=SCENE.image, caption=SCENE.caption, **options):
        return invert(shapes_pipe, image, caption, steps=3, cache_dir=tmp_path, **options)

    first = run()
    again = run()
    assert first.seconds > 0 and again.seconds == 0 and torch.equal(first.latents, again.latents)
    changed = SCENE.image.copy()
    changed[0, 0] ^= 1
    assert run(image=changed).seconds > 0
    assert run(caption=SCENE.caption.replace("above", "below")).seconds > 0
    assert run(method="ddim").seconds > 0
    with torch.no_grad():
        shapes_pipe.unet.conv_out.bias[0] += 1e-3
    try:
        assert run().seconds > 0
    finally:
        with torch.no_grad():
            shapes_pipe.unet.conv_out.bias[0] -= 1e-3
    assert run().seconds == 0
    assert len(list(tmp_path.glob("*.safetensors"))) == 5 and not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_cache_entry_is_rebuilt(shapes_pipe, tmp_path, damage):
    first = invert(shapes_pipe, SCENE.image, SCENE.caption, steps=3, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.safetensors")
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-5] ^= 0x40  # one bit of the last latent value
    entry.write_bytes(bytes(data))
    again = invert(shapes_pipe, SCENE.image, SCENE.caption, steps=3, cache_dir=tmp_path)
    assert again.seconds > 0 and torch.equal(first.latents, again.latents)
    assert invert(shapes_pipe, SCENE.image, SCENE.caption, steps=3, cache_dir=tmp_path).seconds == 0


@pytest.mark.parametrize("side", [8_000, 100_000])
def test_huge_images_are_refused_before_they_are_decoded(tmp_path, side):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(side, side))
    with pytest.raises(ValueError, match="more than the 50 megapixels xattn reads; it was not decoded"):
        prepare_image(bomb, (32, 32))
    with pytest.raises(ValueError, match="the image is .*more than the 50 megapixels"):
        prepare_image(bomb.read_bytes(), (32, 32))


def test_an_animation_says_only_its_first_frame_is_used(tmp_path):
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    prepared = prepare_image(tmp_path / "a.gif", (32, 32))
    assert prepared.notes == ["first frame only, of the 3 of an animation", "converted from mode P to RGB"]
    assert np.asarray(prepared.image)[0, 0].tolist() == [255, 0, 0]


def test_prepare_image_fits_any_input_and_says_what_it_did(tmp_path):
    rgba = Image.new("RGBA", (80, 64), (255, 0, 0, 0))
    prepared = prepare_image(rgba, (32, 32))
    assert prepared.image.size == (32, 32) and prepared.image.mode == "RGB"
    assert np.asarray(prepared.image)[16, 16].tolist() == [255, 255, 255]
    assert prepared.notes == ["transparent pixels composited on white", "centre-cropped 80x64 to 64x64", "resized 64x64 to the model's 32x32"]
    grey = tmp_path / "grey.png"
    Image.new("L", (32, 32), 128).save(grey)
    assert prepare_image(grey, (32, 32)).notes == ["converted from mode L to RGB"]
    assert prepare_image(np.zeros((32, 32, 3), np.float32), (32, 32)).notes == []
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="could not read .*notes.txt as an image"):
        prepare_image(tmp_path / "notes.txt", (32, 32))
    with pytest.raises(FileNotFoundError, match="no image file"):
        prepare_image(tmp_path / "missing.png", (32, 32))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        prepare_image(np.full((8, 8, 3), 2.0), (32, 32))
    with pytest.raises(ValueError, match="shape"):
        prepare_image(np.zeros((8, 8, 2), np.uint8), (32, 32))
