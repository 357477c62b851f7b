"""Every capability on the setups users run: tiny pipelines built like the real ones (`tests.architectures.SETUPS`)
x trace, Prompt-to-Prompt, inversion + edit, attention-loss guidance and unlearning.

Each cell runs and is checked on values, or is refused with the message in `REFUSED` before the
first UNet call. After every cell the pipeline has its own processors (also after an error in
the middle of a run) and its own weights.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
from PIL import Image

import xattn
from editors import LocalBlend, Refine, Reweight, Swap
from pipelines.edit import prompt_to_prompt
from pipelines.erasure import apply_erasure
from pipelines.guidance import compose, method_settings
from pipelines.images import image_to_latent, latent_to_image
from pipelines.inversion import invert
from pipelines.unlearn import UnlearnSettings, unlearn
from tests.architectures import SETUPS
from xattn.conditioning import denoiser_output, encode_text, image_embeds, with_images
from xattn.denoiser import base_parameters, denoiser

CAPABILITIES = ("trace", "swap", "refine", "reweight", "blend", "invert+edit", "astar", "attend-excite", "uce", "esd-x", "fmn", "salun")
SOURCE, TARGET = "a red circle and a blue square", "a red circle and a green square"
_NO_LATENTS = "cannot redraw an inversion"
_FROM_NOISE = "generates from noise"
_IP_TRAIN = "IP-Adapter loaded: pipe.unload_ip_adapter() first"
REFUSED = {
    ("sd15+ip-adapter", "invert+edit"): "IP-Adapter loaded",
    ("sdxl+ip-adapter", "invert+edit"): "IP-Adapter loaded",
    ("sd15-img2img", "invert+edit"): _NO_LATENTS,
    ("sd15-inpaint", "invert+edit"): _NO_LATENTS,
    ("sdxl-inpaint", "invert+edit"): _NO_LATENTS,
    **{(setup, method): _FROM_NOISE for setup in ("sd15-img2img", "sd15-inpaint", "sdxl-img2img", "sdxl-inpaint", "sdxl-refiner")
       for method in ("astar", "attend-excite")},
    **{(setup, method): _IP_TRAIN for setup in ("sd15+ip-adapter", "sdxl+ip-adapter") for method in ("esd-x", "fmn", "salun")},
}


@functools.cache
def setup(name: str):
    return SETUPS[name]()


def _picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def call_options(name: str) -> dict:
    """What each pipeline kind needs in its call: an input image, a mask, an IP-Adapter image."""
    options = {}
    if "img2img" in name or "refiner" in name or "inpaint" in name:
        options |= {"image": _picture(0), "strength": 0.9}
    if "inpaint" in name:
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24] = 255
        options["mask_image"] = Image.fromarray(mask)
    if "ip-adapter" in name:
        options["ip_adapter_image"] = _picture(1)
    return options


def tolerance(pipe) -> float:
    """How far two runs that should agree may differ: rounding of float32, or of half precision."""
    return 1e-4 if pipe.unet.dtype == torch.float32 else 2e-2


def processors_of(pipe) -> dict:
    return dict(denoiser(pipe).attn_processors)


def _stock(pipe, prompts: list[str], steps: int, options: dict, seed: int = 0) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed) for _ in prompts]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, generator=generators, output_type="np", **options).images


def _prediction(pipe, prompt: str, options: dict) -> torch.Tensor:
    """The UNet's output for a fixed latent and the prompt: what an erasure must change."""
    with torch.no_grad():
        cond, uncond = encode_text(pipe, [prompt], (32, 32))
        cond, _ = with_images(cond, uncond, image_embeds(pipe, options.get("ip_adapter_image")))
        latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(pipe.unet.dtype)
        return denoiser_output(pipe, latent, 500, cond).float()


def run_cell(name: str, capability: str) -> None:
    pipe, options = setup(name), call_options(name)
    tol = tolerance(pipe)
    if capability == "trace":
        prompts = [SOURCE] if "ip-adapter" in name else [SOURCE, TARGET]
        each = dict(options, num_images_per_prompt=2) if "ip-adapter" in name else options

        def run():
            return pipe(prompts, num_inference_steps=2, guidance_scale=5.0, output_type="np",
                        generator=[torch.Generator().manual_seed(0) for _ in range(2)], **each).images

        stock = run()
        with xattn.attach(pipe, xattn.Controller()):
            attached = run()
        with xattn.trace(pipe, per_layer=True) as tc:
            traced = run()
        assert np.abs(attached - stock).max() < (1e-5 if tol < 1e-3 else tol)  # xattn's processors compute what the stock ones do
        assert np.abs(traced - stock).max() < tol  # explicit probabilities where maps are recorded: rounding apart
        for image in range(2):
            shares = tc.word_maps(image=image, normalise="tokens")
            assert "square" in shares and np.isfinite(sum(shares.values())).all()
        layer = next(n.removesuffix(".processor") for n in processors_of(pipe) if n.endswith("attn2.processor"))
        assert tc.token_maps(layers=[layer]).shape[0] == 77  # layers by their diffusers names, compiled or not
        return
    if capability in ("swap", "refine", "reweight", "blend"):
        edits = {"swap": (TARGET, Swap(), None), "refine": (SOURCE + " on the left", Refine(), None),
                 "reweight": (SOURCE, Reweight({"blue": 3.0}), None), "blend": (TARGET, Swap(), LocalBlend(["blue"], ["green"], start=1))}
        target, edit, blend = edits[capability]
        result = prompt_to_prompt(pipe, [SOURCE, target], edit, blend=blend, steps=3, output_type="np", **options)
        stock = _stock(pipe, [SOURCE, target], 3, options)
        images = np.stack(result.images)
        assert np.isfinite(images).all()
        assert np.abs(images[0] - stock[0]).max() < tol  # the source is plain generation
        if pipe.unet.dtype == torch.float32:
            assert np.abs(images[1] - stock[1]).max() > tol  # the edit changed the target (tiny random models answer text weakly)
        else:  # in half precision, the same edit as in float32
            exact = prompt_to_prompt(setup(name.split("+")[0]), [SOURCE, target], edit, blend=blend, steps=3, output_type="np", **options)
            assert np.abs(images - np.stack(exact.images)).max() < tol
        return
    if capability == "invert+edit":
        inversion = invert(pipe, _picture(2), "a red circle", steps=3, cache_dir=None)
        source, edited = prompt_to_prompt(pipe, ["a red circle", "a red square"], steps=3, inversion=inversion, output_type="np",
                                          **{k: v for k, v in options.items() if k == "ip_adapter_image"}).images
        redrawn = np.asarray(latent_to_image(pipe, image_to_latent(pipe, inversion.image)), dtype=np.float32) / 255
        assert np.abs(source - redrawn).max() < max(tol, 1 / 255 + 1e-3)  # direct inversion redraws the input's VAE round trip
        assert np.isfinite(edited).all() and np.abs(edited - source).max() > 0
        return
    if capability in ("astar", "attend-excite"):
        settings = method_settings(capability, max_refinements=2)
        guided = compose(pipe, SOURCE, ["circle", "square"], settings=settings, steps=3, output_type="np", **options)
        plain = compose(pipe, SOURCE, ["circle", "square"], method="none", steps=3, output_type="np", **options)
        assert np.isfinite(guided.images[0]).all() and np.isfinite(guided.losses[0].numpy()).all()
        assert np.abs(guided.images[0] - plain.images[0]).max() > 0
        return
    settings = UnlearnSettings(method=capability, concept="circle", guide="square", steps=2, sample_steps=2, images_per_prompt=1,
                               batch=2, preserve=("a blue square",) if capability == "salun" else ())
    tensors = unlearn(pipe, settings, progress=False).tensors
    own = base_parameters(pipe)
    assert tensors and set(tensors) <= set(own)
    assert all(t.dtype == own[n].dtype and torch.isfinite(t).all() for n, t in tensors.items())
    before = _prediction(pipe, "a red circle", options)
    with apply_erasure(pipe, tensors):
        assert (_prediction(pipe, "a red circle", options) - before).abs().max() > 0  # the erasure reaches what the model reads
    assert torch.equal(_prediction(pipe, "a red circle", options), before)


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("name", list(SETUPS))
def test_capability_runs_or_is_refused_clearly(name, capability):
    pipe = setup(name)
    processors = processors_of(pipe)
    weights = {n: p.detach().clone() for n, p in base_parameters(pipe).items()}
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        if (name, capability) in REFUSED:
            with pytest.raises(ValueError, match=re.escape(REFUSED[name, capability])):
                run_cell(name, capability)
            assert not calls
        else:
            run_cell(name, capability)
    finally:
        hook.remove()
    assert processors_of(pipe) == processors
    assert all(torch.equal(p, weights[n]) for n, p in base_parameters(pipe).items())


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd15+ip-adapter", "sdxl-refiner"])
def test_processors_come_back_after_an_error_in_the_middle_of_a_run(name):
    pipe, options = setup(name), call_options(name)
    processors = processors_of(pipe)

    def fail(pipeline, step, timestep, tensors):
        if step == 1:
            raise RuntimeError("stopped at step 1")
        return {}

    with pytest.raises(RuntimeError, match="stopped at step 1"):
        prompt_to_prompt(pipe, [SOURCE, TARGET], steps=3, callback_on_step_end=fail, **options)
    assert processors_of(pipe) == processors
