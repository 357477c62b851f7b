"""A-STAR and Attend-and-Excite on MM-DiT joint attention (issue 31): the losses read the image x text block of the
joint softmax, in the autograd graph, on tiny random SD3 and Flux pipelines (flow-matching samplers, Flux's packed
latents and distilled guidance)."""

import numpy as np
import pytest
import torch

from pipelines.guidance import compose, method_settings
from tests.architectures import TRANSFORMERS
from tests.test_cli import xattn as run_cli
from xattn.attach import attach
from xattn.capture import MapCapture
from xattn.conditioning import denoiser_output, encode_text

PROMPT = "a red circle and a blue square"
OPTIONS = {"steps": 3, "height": 32, "width": 48, "output_type": "np", "seed": 3}
_BUILT: dict = {}


def built(name: str):
    if name not in _BUILT:
        _BUILT[name] = TRANSFORMERS[name]()
    return _BUILT[name]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_no_guidance_is_plain_generation_and_astar_moves_the_image(name):
    pipe = built(name)
    plain = pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, height=32, width=48, generator=torch.Generator().manual_seed(3),
                 output_type="np").images
    none = compose(pipe, PROMPT, ["circle", "square"], method="none", **OPTIONS)
    assert np.abs(none.images[0] - plain[0]).max() < 1e-5
    guided = compose(pipe, PROMPT, ["circle", "square"], **OPTIONS)
    assert guided.step_maps.shape == (3, 1, 2, 8, 12)  # the patch grid (Flux's 2x2-packed tokens)
    assert torch.isfinite(guided.losses).all() and np.abs(guided.images[0] - none.images[0]).max() > 1e-3


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_attend_and_excite_runs_on_joint_attention(name):
    result = compose(built(name), PROMPT, ["circle", "square"], method="attend-excite", **OPTIONS)
    assert torch.isfinite(result.losses[:2]).all() and result.losses[2].isnan().all()  # guided_steps 0.5 of 3: steps 0, 1


def test_the_capture_reads_the_image_text_block_of_the_chosen_blocks():
    """One block's capture is its joint softmax's image rows at the text keys: rows sum to the share the text takes,
    less than 1 (the image keys take the rest); all blocks average to another map; a block that is not there is
    named with the ones that are."""
    pipe = built("sd3")
    text, _ = encode_text(pipe, [PROMPT], (32, 48))
    latents = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    maps = {}
    for blocks in ({"double": [0]}, None):
        capture = MapCapture(12, blocks)
        with attach(pipe, capture), torch.no_grad():
            maps[str(blocks)] = capture.run(lambda: denoiser_output(pipe, latents, 500.0, text), stop_early=False)
    one = maps[str({"double": [0]})]
    assert one.shape == (1, 8, 12, 77 + 256)  # CLIP's positions, then T5's
    assert (one.sum(-1) < 1).all() and (one.sum(-1) > 0).all()
    assert (maps["None"] - one).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"blocks double: \[7\] is not among StableDiffusion3Pipeline's joint-attention blocks \(double: 0-2\)"):
        compose(pipe, PROMPT, ["circle", "square"], settings=method_settings("astar", blocks={"double": (7,)}), **OPTIONS)


def test_the_compose_command_takes_a_flow_model(tmp_path):
    built("sd3").save_pretrained(tmp_path / "model")
    result = run_cli("compose", PROMPT, "--concepts", "circle,square", "--model", str(tmp_path / "model"), "--steps", "2",
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "image.png").exists() and (tmp_path / "out" / "maps.npz").exists()
