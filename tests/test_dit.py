"""Inversion, guidance and erasure on PixArt-alpha's DiT cross-attention through the UNet's code (issue 31): the
denoiser call and its text conditioning are the seam (`xattn.conditioning`), on a tiny random PixArt built like the
real one (T5 tokens with no start-of-text, learnt variance, DPM-Solver++, the older step callback)."""

import numpy as np
import pytest
import torch

from editors.specs import Swap
from pipelines.edit import prompt_to_prompt
from pipelines.erasure import load_erasure
from pipelines.guidance import compose
from pipelines.images import image_to_latent
from pipelines.inversion import invert, reconstruct
from pipelines.unlearn import UnlearnSettings, erase, unlearn
from tests.architectures import pixart
from tests.test_flow_inversion import picture
from xattn.conditioning import encode_text, text_context
from xattn.tokens import pipeline_word_tokens

PROMPT = "a red circle and a blue square"
OPTIONS = {"steps": 3, "height": 32, "width": 48, "output_type": "np", "use_resolution_binning": False}


@pytest.fixture(scope="module")
def pipe():
    return pixart()


def test_pixart_inverts_by_ddim_and_direct_redraws_it_exactly(pipe):
    """PixArt's DiT (learnt variance, DPM-Solver++) through the UNet's DDIM inversion: the denoiser call is the seam."""
    inversion = invert(pipe, picture(), "a red circle", steps=4, guidance=3.0, height=32, width=48, cache_dir=None)
    encoded = image_to_latent(pipe, inversion.image)
    redrawn = reconstruct(pipe, inversion, output_type="latent", use_resolution_binning=False)
    assert (redrawn[None] - encoded).abs().max() < 1e-5
    result = prompt_to_prompt(pipe, ["a red circle", "a red square"], Swap(), steps=4, guidance=3.0, inversion=inversion,
                              output_type="latent", use_resolution_binning=False)
    assert (result.images[0][None] - encoded).abs().max() < 1e-5 and (result.images[1] - redrawn).abs().max() > 1e-3



def test_no_guidance_is_plain_generation_and_guidance_changes_the_image(pipe):
    plain = pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, height=32, width=48, use_resolution_binning=False,
                 generator=torch.Generator().manual_seed(3), output_type="np").images
    none = compose(pipe, PROMPT, ["circle", "square"], method="none", seed=3, **OPTIONS)
    assert np.abs(none.images[0] - plain[0]).max() < 1e-5
    assert none.step_maps.shape == (3, 1, 2, 8, 12)  # the patch grid
    guided = compose(pipe, PROMPT, ["circle", "square"], method="astar", seed=3, **OPTIONS)
    assert not guided.losses[:1].isnan().any() and np.abs(guided.images[0] - none.images[0]).max() > 1e-4


def test_attend_and_excite_runs_on_t5_tokens(pipe):
    """T5 has no start-of-text: the token softmax starts at position 0, and a concept there has a share of its own."""
    result = compose(pipe, "circle and square", ["circle", "square"], method="attend-excite", seed=0, **OPTIONS)
    assert not result.losses[:1].isnan().any()
    assert result.step_maps[0, 0, 0].amax() == 1.0 and result.step_maps[0, 0, 0].std() > 0


def keys(pipe, prompt: str) -> torch.Tensor:
    """Every cross-attention layer's keys of a prompt's caption-projected T5 tokens, stacked."""
    text, _ = encode_text(pipe, [prompt], (32, 48))
    context = text_context(pipe, text.embeds)
    with torch.no_grad():
        return torch.stack([block.attn2.to_k(context) for block in pipe.transformer.transformer_blocks])


def test_uce_erases_in_closed_form_on_the_caption_projection(pipe, tmp_path):
    """UCE solves on what the keys are computed from: T5's outputs through PixArt's caption projection. After it, the
    concept's context has the guide's keys from the concept on, and a preserved prompt keeps its own."""
    settings = UnlearnSettings(method="uce", concept="circle", guide="square", contexts=("a red circle",), preserve=("a blue triangle",))
    before = keys(pipe, "a blue triangle"), keys(pipe, "a red square")
    path = erase(pipe, settings, out=tmp_path, model="tiny-pixart", progress=False)
    with load_erasure(pipe, path) as erasure:
        assert set(erasure.originals) <= {f"transformer_blocks.{i}.attn2.{p}.weight" for i in range(2) for p in ("to_k", "to_v")}
        erased, kept = keys(pipe, "a red circle"), keys(pipe, "a blue triangle")
        circle = pipeline_word_tokens(pipe, "a red circle", "circle")[0]
        target = before[1][:, :, circle:]
        assert ((erased[:, :, circle:] - target).norm() / target.norm()) < 0.2
        assert ((kept - before[0]).norm() / before[0].norm()) < 0.05
    assert torch.equal(keys(pipe, "a blue triangle"), before[0])  # removed


def test_esd_x_trains_the_dit_cross_attention_only(pipe):
    settings = UnlearnSettings(method="esd-x", concept="circle", guide="square", contexts=("a red circle",), steps=2, sample_steps=2)
    result = unlearn(pipe, settings)
    assert result.tensors and all(".attn2." in name for name in result.tensors)
    assert all(torch.isfinite(t).all() for t in result.tensors.values())
    own = dict(pipe.transformer.named_parameters())
    assert any(not torch.equal(t, own[name]) for name, t in result.tensors.items())
