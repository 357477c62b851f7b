"""Prompt-to-Prompt through real pipelines: fused edits equal the explicit reference on every architecture,
the source is plain generation, no injection is plain generation of the target, and bad input fails early."""

from pathlib import Path

import numpy as np
import pytest
import torch

import xattn
from editors import LocalBlend, PromptToPrompt, Refine, Reweight, Swap
from editors.blend import blend_latents, region, user_region
from editors.edits import swap
from pipelines.edit import prompt_to_prompt
from pipelines.loading import load_pipeline
from tests.architectures import ARCHITECTURES
from xattn.families import cross_resolutions, layout_side
from xattn.sites import Layer, Site

SWAP = ["a red circle and a blue square", "a red circle and a green square"]
CASES = {
    "swap+blend": dict(prompts=SWAP, edit=Swap(), blend=LocalBlend(["blue"], ["green"], start=1)),
    "refine": dict(prompts=["a circle", "a red circle"], edit=Refine(), cross_steps={"default": 1.0, "red": 0.5}),
    "reweight on swap": dict(prompts=SWAP, edit=Reweight({"green": 2.0, "circle": 0.5}, base=Swap()), self_steps=(1, 3)),
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request):
    return ARCHITECTURES[request.param]()


@pytest.fixture(scope="module")
def shapes_pipe():
    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("case", list(CASES))
def test_fused_edits_equal_the_explicit_reference(arch, case):
    options = dict(CASES[case], steps=3, output_type="np", self_resolution=64)
    fused = prompt_to_prompt(arch, **options).images
    explicit = prompt_to_prompt(arch, **options, explicit=True).images
    assert np.abs(np.stack(fused) - np.stack(explicit)).max() < 1e-5


def test_fused_equals_explicit_without_guidance(arch):
    options = dict(prompts=SWAP, steps=2, guidance=1.0, output_type="np")
    assert np.abs(np.stack(prompt_to_prompt(arch, **options).images) - np.stack(prompt_to_prompt(arch, **options, explicit=True).images)).max() < 1e-5


def _sdpa_kernels(run) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


def test_fused_edits_stay_on_the_fused_kernel(shapes_pipe):
    """Every fused edit keeps SDPA on the kernel plain generation uses: values wider than the
    queries (e.g. several rows' values side by side) would send it to the slow math kernel."""
    stock = _sdpa_kernels(lambda: shapes_pipe(SWAP, num_inference_steps=2, output_type="np"))
    assert stock and not any("math" in k for k in stock)
    for case in CASES.values():
        options = dict(case, steps=2, output_type="np", self_steps=1.0, self_resolution=16)
        assert _sdpa_kernels(lambda: prompt_to_prompt(shapes_pipe, **options)) <= stock


def test_source_is_plain_generation_and_no_injection_is_plain_generation_of_the_target(shapes_pipe):
    prompts = ["a red circle", "a red square"]
    common = dict(num_inference_steps=5, guidance_scale=5.0, output_type="np")
    plain = [shapes_pipe(p, generator=torch.Generator().manual_seed(7), **common).images[0] for p in prompts]
    batch = shapes_pipe(prompts, generator=[torch.Generator().manual_seed(7) for _ in prompts], **common).images
    free = prompt_to_prompt(shapes_pipe, prompts, cross_steps=0, self_steps=0, seed=7, steps=5, output_type="np").images
    assert np.abs(np.stack(free) - batch).max() < 1e-6
    # a batch of two sums in another order than one prompt alone: up to 3e-5 on some CPUs
    assert np.abs(free[0] - plain[0]).max() < 1e-4 and np.abs(free[1] - plain[1]).max() < 1e-4
    injected = prompt_to_prompt(shapes_pipe, prompts, seed=7, steps=5, output_type="np").images
    assert np.abs(injected[0] - batch[0]).max() < 1e-5
    assert np.abs(injected[1] - plain[0]).mean() < 0.9 * np.abs(plain[1] - plain[0]).mean()  # closer to the source than without injection


def test_maps_are_the_attention_each_image_used(shapes_pipe):
    prompts = ["a red circle", "a red square"]
    common = dict(seed=7, steps=4, output_type="np", self_steps=0)
    plain = prompt_to_prompt(shapes_pipe, prompts, cross_steps=1.0, **common).images
    injected = prompt_to_prompt(shapes_pipe, prompts, cross_steps=1.0, maps=True, **common)
    assert np.abs(np.stack(injected.images) - np.stack(plain)).max() < 1e-6  # recording changes nothing
    source = injected.maps.word_maps(image=0, normalise="none")
    target = injected.maps.word_maps(image=1, normalise="none")
    assert list(target) == ["a", "red", "square"]
    for word, swapped in (("a", "a"), ("red", "red"), ("circle", "square")):  # injected at every step: the source's maps
        assert np.abs(target[swapped] - source[word]).max() < 1e-6
    own = prompt_to_prompt(shapes_pipe, prompts, cross_steps=0, maps=True, **common).maps
    with xattn.trace(shapes_pipe) as tc:
        shapes_pipe("a red square", num_inference_steps=4, guidance_scale=5.0, latents=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7)))
    alone = tc.word_maps(image=0, normalise="none")
    drawn = own.word_maps(image=1, normalise="none")
    assert np.abs(drawn["square"] - alone["square"]).max() < 1e-4 and np.abs(drawn["square"] - source["circle"]).max() > 1e-2


def test_layers_run_plain_outside_every_injection_window():
    schedules = torch.zeros(2, 5, 77)
    schedules[0, :2] = 1  # the first target takes the source's attention at steps 0 and 1
    schedules[1, 3, 5] = 1  # the second only for one word's token, at step 3
    controller = PromptToPrompt([swap(torch.eye(77))] * 2, schedules, (1, 2), 8)
    cross = [controller.handles(Site(Layer("up.attn2", "cross", "up"), (16, 16), step, 0.25)) for step in range(5)]
    assert cross == [True, True, False, True, False]
    self_sites = [controller.handles(Site(Layer("up.attn1", "self", "up"), (side, side), step, 0.25)) for step, side in ((0, 8), (1, 8), (1, 16), (2, 8))]
    assert self_sites == [False, True, False, False]


def test_local_blend_keeps_the_source_latent_outside_the_mask(shapes_pipe):
    mask = np.zeros((64, 64))
    mask[16:48, 16:48] = 1  # latent cells 4..11
    latents = prompt_to_prompt(shapes_pipe, ["a red circle", "a blue circle"], seed=1, steps=5, output_type="latent",
                               blend=LocalBlend(mask=mask, start=0)).images
    changed = (latents[0] - latents[1]).abs().amax(0) > 0
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:12, 4:12] = True
    assert not changed[~inside].any() and changed[inside].float().mean() > 0.5


def test_blend_algebra_by_hand():
    maps = torch.tensor([[[0.0, 1.0], [0.2, 0.1]]])
    assert region(maps, (2, 2), 0.3, pool=False).tolist() == [[[False, True], [False, False]]]
    assert region(maps, (4, 4), 0.3, pool=True).all()  # 3x3 max-pool spreads the peak over a 2x2 map
    latents = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    out = blend_latents(latents, torch.tensor([[[True, False], [False, False]]]))
    two = blend_latents(torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), 2.0), torch.ones(1, 2, 2), torch.full((1, 2, 2), 3.0)]),
                        torch.tensor([[True, False], [False, False]]).expand(2, 2, 2), images=2)
    assert two[2, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]] and two[3, 0].tolist() == [[3.0, 2.0], [2.0, 2.0]]  # image j keeps source j outside
    assert out[1, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]] and out[0].eq(0).all()
    assert user_region(np.eye(4), (2, 2)).tolist() == [[True, False], [False, True]]


def test_cross_resolutions_follow_the_latent(shapes_pipe):
    assert cross_resolutions(shapes_pipe.unet, (16, 16)) == [4, 8, 16]
    assert cross_resolutions(shapes_pipe.unet, (32, 32)) == [8, 16, 32]
    assert cross_resolutions(ARCHITECTURES["sd1-64"]().unet, (64, 64)) == [8, 16, 32, 64]


def test_the_layout_side_is_the_papers_16_on_sd1_at_512_px(shapes_pipe):
    assert layout_side(ARCHITECTURES["sd1-64"]().unet, (64, 64)) == 16  # 64, 32, 16 and the 8x8 mid block
    assert layout_side(ARCHITECTURES["sdxl"]().unet, (128, 128)) == 64  # no cross-attention at 128, then 64 and its mid block
    assert layout_side(shapes_pipe.unet, (16, 16)) == 8
    assert layout_side(shapes_pipe.unet, (16, 24)) == 12


def test_bad_input_fails_before_any_step(shapes_pipe):
    calls = []
    hook = shapes_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="same number of words.*refine"):
            prompt_to_prompt(shapes_pipe, ["a red circle", "a big red circle"], Swap())
        with pytest.raises(ValueError, match="'green' is not a word of the prompt 'a red circle'; its words are: a, red, circle"):
            prompt_to_prompt(shapes_pipe, ["a blue circle", "a red circle"], blend=LocalBlend(["blue"], ["green"]))
        with pytest.raises(ValueError, match="'blue' is not a word"):
            prompt_to_prompt(shapes_pipe, ["a red circle", "a red square"], Reweight({"blue": 2.0}))
        with pytest.raises(ValueError, match="outside 0..25"):
            prompt_to_prompt(shapes_pipe, ["a red circle", "a red square"], cross_steps=30)
        with pytest.raises(ValueError, match="outside"):
            prompt_to_prompt(shapes_pipe, ["a red circle", "a red square"], self_steps=(0.5, 1.5))
        with pytest.raises(ValueError, match="cannot choose an edit"):
            prompt_to_prompt(shapes_pipe, ["a red circle", "a square"])
        with pytest.raises(ValueError, match="source prompt and at least one target"):
            prompt_to_prompt(shapes_pipe, ["a red circle"])
    finally:
        hook.remove()
    assert not calls


def test_a_batch_laid_out_otherwise_than_the_edit_is_refused_clearly(shapes_pipe):
    controller = PromptToPrompt([swap(torch.eye(77))], torch.ones(1, 2, 77), (0, 0), 16)
    with xattn.attach(shapes_pipe, controller), pytest.raises(ValueError, match=r"1 source \+ 1 target\(s\), 1 image\(s\) each"):
        shapes_pipe(["a red circle", "a red circle"], num_images_per_prompt=2, num_inference_steps=2)


@pytest.mark.parametrize("blend", [None, LocalBlend(["circle"], ["square"], start=1)])
def test_several_images_per_prompt_are_the_edits_of_several_seeds(shapes_pipe, blend):
    prompts = ["a red circle", "a red square"] if blend else ["a red circle", "a red square", "a blue circle"]
    common = dict(steps=4, output_type="np", blend=blend)
    batch = prompt_to_prompt(shapes_pipe, prompts, seed=3, num_images_per_prompt=2, **common).images
    alone = [prompt_to_prompt(shapes_pipe, prompts, seed=seed, **common).images for seed in (3, 4)]
    for p in range(len(prompts)):
        for j in range(2):
            assert np.abs(batch[p * 2 + j] - alone[j][p]).max() < 1e-4, (p, j)


def test_call_options_reach_the_pipeline(shapes_pipe):
    prompts = ["a red circle", "a red square"]
    stock = shapes_pipe(prompts, num_inference_steps=3, guidance_scale=5.0, height=64, width=96, negative_prompt=["blue"] * 2,
                        generator=[torch.Generator().manual_seed(2) for _ in prompts], guidance_rescale=0.3, output_type="np").images
    edited = prompt_to_prompt(shapes_pipe, prompts, steps=3, seed=2, height=64, width=96, negative_prompt="blue", guidance_rescale=0.3,
                              blend=LocalBlend(["circle"], ["square"], start=1), output_type="np").images
    assert edited[0].shape == (64, 96, 3)
    assert np.abs(edited[0] - stock[0]).max() < 1e-5  # the source is the pipeline's own image with every option
    seen = []
    prompt_to_prompt(shapes_pipe, prompts, steps=3, seed=2, output_type="latent",
                     callback_on_step_end=lambda p, call, t, tensors: seen.append(call) or {})
    assert seen == [0, 1, 2]  # the caller's callback runs beside xattn's own


def test_google_conventions_reproduce_the_community_pipeline(shapes_pipe):
    """The diffusers community pipeline (google's semantics), run by benchmarks/p2p_reference.py, to 1 level of 8 bits."""
    from benchmarks.p2p_reference import CASES, GUIDANCE, STEPS
    from editors.conventions import GOOGLE

    fixture = np.load(Path(__file__).parent / "fixtures" / "p2p_google.npz")
    kinds = {"replace": lambda o: Swap(), "refine": lambda o: Refine(),
             "reweight": lambda o: Reweight(dict(zip(o["equalizer_words"], o["equalizer_strengths"])))}
    for name, (source, target, options, seed) in CASES.items():
        ours = prompt_to_prompt(shapes_pipe, [source, target], kinds[options["edit_type"]](options), cross_steps=options["n_cross_replace"],
                                self_steps=options["n_self_replace"], seed=seed, steps=STEPS, guidance=GUIDANCE, conventions=GOOGLE,
                                output_type="np").images
        ours = np.rint(np.stack(ours) * 255).astype(np.int16)
        assert np.abs(ours - fixture[name]).max() <= 1, name
