import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import xattn
from tests.architectures import ARCHITECTURES
from xattn.controller import explicit_probs
from xattn.families import UNet
from xattn.sites import BatchLayout, query_resolution

PROMPTS = ["a red circle and a blue square", "a green triangle"]
SIZES = {"sd1-64": 128}


class EverySite(xattn.Controller):
    """Computes explicit probabilities on every layer, self-attention included, and changes nothing."""

    def handles(self, site):
        return True

    def attend(self, site, query, key, value, mask):
        return explicit_probs(query, key, mask, site.scale) @ value


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request):
    return request.param, ARCHITECTURES[request.param]()


def run(pipe, name, steps=2, **kwargs):
    size = SIZES.get(name, 32)
    options = dict(num_inference_steps=steps, guidance_scale=5.0, output_type="np", height=size, width=size)
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **(options | kwargs)).images


def test_attached_controllers_leave_images_unchanged(arch):
    name, pipe = arch
    stock = run(pipe, name)
    for controller in (xattn.Controller(), xattn.AttentionStore(), EverySite()):
        with xattn.attach(pipe, controller):
            assert np.abs(run(pipe, name) - stock).max() < 1e-5, type(controller).__name__


def test_processors_come_back_after_exit_and_after_an_error(arch):
    _, pipe = arch
    before = pipe.unet.attn_processors
    with xattn.trace(pipe):
        assert all(type(p).__name__ == "XAttnProcessor" for p in pipe.unet.attn_processors.values())
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(KeyError):
        with xattn.trace(pipe):
            raise KeyError("inside the block")
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    assert "encode_prompt" not in vars(pipe)


def test_attaching_twice_is_refused_and_later_allowed(arch):
    _, pipe = arch
    with xattn.attach(pipe, xattn.Controller()):
        with pytest.raises(RuntimeError, match="already attached"):
            with xattn.attach(pipe.unet, xattn.Controller()):
                pass
    with xattn.attach(pipe.unet, xattn.Controller()):
        pass


def test_rows_resolutions_and_steps_follow_the_call(arch):
    name, pipe = arch
    with xattn.trace(pipe, per_step=True) as tc:
        run(pipe, name, steps=3, num_images_per_prompt=2)
    assert tc.prompts == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert {key.step for key in tc.store.sums} == {0, 1, 2}
    assert {sums.shape[0] for sums in tc.store.sums.values()} == {4}
    latent = SIZES.get(name, 32) // pipe.vae_scale_factor
    assert max(max(key.resolution) for key in tc.store.sums) <= latent
    with xattn.trace(pipe) as tc:
        run(pipe, name, guidance_scale=1.0)
    assert {sums.shape[0] for sums in tc.store.sums.values()} == {2}


def test_store_memory_is_flat_in_steps(arch):
    name, pipe = arch
    sizes, counts, calls = [], [], []
    for steps in (2, 5):
        with xattn.trace(pipe) as tc:
            run(pipe, name, steps=steps)
        sizes.append(tc.store.nbytes())
        counts.append(tc.store.counts)
        calls.append(len(pipe.scheduler.timesteps))  # PNDM calls the UNet once more than it has steps
    assert sizes[0] == sizes[1]
    assert counts[0].keys() == counts[1].keys() and all(counts[1][k] * calls[0] == counts[0][k] * calls[1] for k in counts[0])


def test_maps_are_probabilities_of_the_conditional_rows(arch):
    name, pipe = arch
    with xattn.trace(pipe, heads=True, per_layer=True) as tc:
        run(pipe, name)
    maps = tc.token_maps(image=1)
    assert maps.shape == (77, SIZES.get(name, 32), SIZES.get(name, 32))
    assert torch.allclose(maps.sum(0), torch.ones(()), atol=1e-4)  # each pixel's attention over tokens sums to 1
    layer = next(iter(tc.store.layers))
    one_head = tc.token_maps(image=1, layers=[layer], heads=[0])
    assert one_head.shape == maps.shape and not torch.allclose(one_head, maps)
    words = tc.word_maps(image=0)
    assert list(words) == ["a", "red", "circle", "and", "a#2", "blue", "square"]
    assert all(m.shape == maps.shape[1:] and m.min() == 0 and m.max() == pytest.approx(1) for m in words.values())
    shares = tc.word_maps(image=0, normalise="tokens")
    assert np.allclose(sum(shares.values()), 1.0, atol=1e-4)  # each pixel's attention split among the words


def test_selection_errors_say_which_option_to_set():
    pipe = ARCHITECTURES["sd1"]()
    with xattn.trace(pipe) as tc:
        with pytest.raises(ValueError, match="nothing was recorded"):
            tc.word_maps()
        run(pipe, "sd1")
    with pytest.raises(ValueError, match="per_layer=True"):
        tc.token_maps(layers=["mid_block.attentions.0.transformer_blocks.0.attn2"])
    with pytest.raises(ValueError, match="per_step=True"):
        tc.token_maps(steps=(0, 1))
    with pytest.raises(ValueError, match="heads=True"):
        tc.token_maps(heads=[0])
    with pytest.raises(ValueError, match=r"resolutions \[4, 8, 16\]"):
        tc.token_maps(resolutions=[64])
    with pytest.raises(ValueError, match="image 5 does not exist"):
        tc.token_maps(image=5)
    with pytest.raises(ValueError, match="'hexagon' is not a word of the prompt"):
        tc.word_maps(["hexagon"])


def test_query_resolution_follows_the_unet_levels():
    assert query_resolution((64, 64), 64 * 64) == (64, 64)
    assert query_resolution((64, 64), 256) == (16, 16)
    assert query_resolution((24, 40), 15) == (3, 5)
    assert query_resolution((25, 25), 13 * 13) == (13, 13)
    with pytest.raises(ValueError, match="match no level"):
        query_resolution((64, 64), 1000)


def test_layers_and_layouts():
    assert UNet.layer("down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor") == xattn.Layer(
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2", "cross", "down", 1)
    assert UNet.layer("mid_block.attentions.0.transformer_blocks.0.attn1.processor").place == "mid"
    assert UNet.layer("up_blocks.2.attentions.1.transformer_blocks.0.attn1.processor").kind == "self"
    layout = BatchLayout(("p", "q"), images_per_prompt=2, guidance=True)
    assert layout.cond(8) == slice(4, 8) and layout.cond(4) == slice(0, 4)
    assert BatchLayout(("p",), guidance=False).cond(1) == slice(0, 1)
    assert [layout.prompt_of_row(r) for r in range(4)] == ["p", "p", "q", "q"]


def test_conditional_calls_treat_any_batch_as_conditional_rows():
    state = xattn.CallState(UNet, None)
    state.restart(BatchLayout(("p", "q", "r"), guidance=True))
    assert state.layout.cond(2) == slice(1, 2)  # a 2-row call of a guided 3-prompt run reads as [uncond, cond]
    with state.conditional_calls():
        assert state.layout.cond(2) == slice(0, 2)
    assert state.layout.cond(6) == slice(3, 6)


def test_traced_prompt_embeds_need_the_text_for_word_maps():
    pipe = ARCHITECTURES["sd1"]()
    embeds = pipe.encode_prompt([PROMPTS[0]], "cpu", 1, False)[0]
    with xattn.trace(pipe) as given:
        pipe(prompt_embeds=embeds, num_inference_steps=2, output_type="np", height=32, width=32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="made from prompt_embeds.*word_maps\\(prompt="):
        given.word_maps()
    with xattn.trace(pipe) as typed:
        pipe(PROMPTS[0], num_inference_steps=2, output_type="np", height=32, width=32, generator=torch.Generator().manual_seed(0))
    named, expected = given.word_maps(prompt=PROMPTS[0]), typed.word_maps()
    assert list(named) == list(expected) and all(np.allclose(named[w], expected[w], atol=1e-5) for w in named)


def test_unknown_processors_are_refused_by_name_before_anything_changes():
    class Custom(AttnProcessor2_0):
        pass

    pipe = ARCHITECTURES["sd1"]()
    pipe.unet.set_attn_processor(Custom())
    before = pipe.unet.attn_processors
    with pytest.raises(TypeError, match="cannot take over the attention processor Custom at down_blocks"):
        with xattn.attach(pipe, xattn.Controller()):
            pass
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
