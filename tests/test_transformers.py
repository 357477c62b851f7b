"""Transformer denoisers through the one seam: SD3/SD3.5 and Flux (MM-DiT joint attention) and PixArt-alpha (DiT
cross-attention), on tiny random pipelines built like the real ones (tests/architectures.py)."""

import numpy as np
import pytest
import torch

import xattn
from tests.architectures import TRANSFORMERS
from tests.test_cli import xattn as run_cli
from ui.app import Handlers
from xattn.attach import attach
from xattn.concept_maps import ConceptStream
from xattn.controller import Controller, attention_and_logsumexp, logsumexp_scores, probs_block
from xattn.denoiser import denoiser
from xattn.families import cross_resolutions, family_of, layout_side, native_side, side_multiple

PROMPTS = ["a red circle", "a blue triangle"]
_BUILT: dict = {}


def built(name: str):
    if name not in _BUILT:
        _BUILT[name] = TRANSFORMERS[name]()
    return _BUILT[name]


def draw(pipe, prompts, seeds, **options) -> np.ndarray:
    """Two steps at 32x48 px (a 16x24 latent: an 8x12 token grid), one seed per image."""
    if type(pipe).__name__.startswith("PixArt"):
        options.setdefault("use_resolution_binning", False)
    options.setdefault("height", 32)
    options.setdefault("width", 48)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=2, generator=generators, output_type="np", **options).images


class Sites(Controller):
    """Handles nothing; keeps every site it is asked about."""

    def __init__(self) -> None:
        self.seen = {}

    def handles(self, site):
        self.seen[site.name] = site
        return False


@pytest.mark.parametrize("name", ["sd3", "sd3-no-t5", "sd3.5", "flux", "pixart"])
def test_traced_output_is_stock_output_and_processors_come_back(name):
    pipe = built(name)
    before = dict(denoiser(pipe).attn_processors)
    stock = draw(pipe, PROMPTS, [0, 1])
    with attach(pipe, Controller()):
        assert np.array_equal(draw(pipe, PROMPTS, [0, 1]), stock)  # nothing handled: the stock fused SDPA
    with xattn.trace(pipe) as tc:
        traced = draw(pipe, PROMPTS, [0, 1])
    assert np.abs(traced - stock).max() <= 1e-5
    assert all(a is b for a, b in zip(denoiser(pipe).attn_processors.values(), before.values()))
    maps = tc.word_maps(image=1)
    assert list(maps) == ["a", "blue", "triangle"] and all(m.shape == (32, 48) and np.isfinite(m).all() for m in maps.values())


@pytest.mark.parametrize("name", ["sd3", "flux"])  # SD3.5's image-only attn2 breaks diffusers' own fused processor
def test_fused_projections_are_computed_as_stock(name):
    pipe = TRANSFORMERS[name]()
    unfused = draw(pipe, PROMPTS[:1], [0])
    pipe.transformer.fuse_qkv_projections()
    stock = draw(pipe, PROMPTS[:1], [0])
    with xattn.trace(pipe):
        traced = draw(pipe, PROMPTS[:1], [0])
    assert np.abs(traced - stock).max() <= 1e-5 and np.abs(stock - unfused).max() <= 1e-4


@pytest.mark.parametrize("name", ["sd3", "flux", "pixart"])
def test_maps_of_a_batch_are_each_prompt_traced_alone(name):
    pipe = built(name)
    with xattn.trace(pipe) as both:
        draw(pipe, PROMPTS, [0, 1])
    with xattn.trace(pipe) as alone:
        draw(pipe, PROMPTS[1:], [1])
    same = (both.token_maps(image=1) - alone.token_maps(image=0)).abs().max()
    other = (both.token_maps(image=0) - alone.token_maps(image=0)).abs().max()  # the other prompt's: a test that can fail
    assert same <= 1e-6 and other > 100 * max(same, 1e-8)


@pytest.mark.parametrize("name", ["sd3", "flux", "pixart"])
def test_non_square_images_and_several_images_per_prompt(name):
    pipe = built(name)
    with xattn.trace(pipe, per_layer=True) as tc:
        images = draw(pipe, PROMPTS, [0, 1, 2, 3], num_images_per_prompt=2, height=48, width=32)
    assert images.shape == (4, 48, 32, 3) and tc.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert {key.resolution for key in tc.store.sums} == {(12, 8)}
    assert all(total.shape[:2] == (4, 96) for total in tc.store.sums.values())
    assert tc.word_maps(["triangle"], image=3)["triangle"].shape == (48, 32)
    assert cross_resolutions(pipe, (24, 16)) == [12] and layout_side(pipe, (24, 16)) == 12


def test_joint_maps_are_blocks_of_one_softmax_over_image_and_text_keys():
    """In joint attention each image query's probabilities over the text keys and over the image keys sum to one
    together: the maps are taken as the model normalises them, not renormalised over the text."""
    for name in ("sd3.5", "flux"):
        pipe = built(name)
        with xattn.trace(pipe, self_attention=True, per_layer=True) as tc:
            draw(pipe, PROMPTS[:1], [0])
        joint = [key.layer for key in tc.store.sums if key.kind == "cross"]
        for layer in joint:
            cross = tc.store.select("cross", layers=[layer])[0]
            self_ = tc.store.select("self", layers=[layer])[0]
            assert torch.allclose((cross[1].sum(-1) + self_[1].sum(-1)) / cross[2], torch.ones(1, 96), atol=1e-5)
            assert (cross[1].sum(-1) / cross[2]).max() < 0.999


def test_sites_name_their_kind_block_and_stream():
    sites = Sites()
    with attach(built("sd3.5"), sites):
        draw(built("sd3.5"), PROMPTS[:1], [0])
    first, second, last = (sites.seen[f"transformer_blocks.{i}.attn"] for i in range(3))
    assert (first.kind, first.place, first.block, first.stream) == ("joint", "transformer", 0, "double")
    assert (first.image, first.text) == (slice(0, 96), slice(96, 96 + 77 + 256)) and first.resolution == (8, 12)
    assert sites.seen["transformer_blocks.1.attn2"].kind == "self" and "transformer_blocks.2.attn2" not in sites.seen
    assert last.text == first.text  # the last block's context is pre-only, but its keys are still joint
    sites = Sites()
    with attach(built("flux"), sites):
        draw(built("flux"), PROMPTS[:1], [0])
    double, single = sites.seen["transformer_blocks.1.attn"], sites.seen["single_transformer_blocks.1.attn"]
    assert (double.stream, single.stream, single.place, single.block) == ("double", "single", "single", 1)
    assert (single.text, single.image) == (slice(0, 512), slice(512, 512 + 96)) == (double.text, double.image)
    sites = Sites()
    with attach(built("pixart"), sites):
        draw(built("pixart"), PROMPTS[:1], [0])
    assert {(s.kind, s.place) for s in sites.seen.values()} == {("self", "transformer"), ("cross", "transformer")}


def test_guidance_off_leaves_no_unconditional_rows():
    flux = built("flux")  # guidance distilled into an embedding: every row is conditional
    with xattn.trace(flux) as tc:
        draw(flux, PROMPTS, [0, 1], guidance_scale=3.5)
    assert not tc.state.layout.guidance and all(t.shape[0] == 2 for t in tc.store.sums.values())
    sd3 = built("sd3")
    with xattn.trace(sd3) as tc:
        draw(sd3, PROMPTS, [0, 1], guidance_scale=1.0)
    assert all(t.shape[0] == 2 for t in tc.store.sums.values())
    with pytest.raises(ValueError, match="true classifier-free guidance"), xattn.trace(flux):
        draw(flux, PROMPTS[:1], [0], negative_prompt="a dog", true_cfg_scale=2.0)


def test_words_are_found_in_every_text_stream():
    assert xattn.pipeline_word_tokens(built("pixart"), "a red triangle", "triangle") == [2, 3]  # ▁tri + angle
    assert xattn.pipeline_word_tokens(built("flux"), "a red circle", "circle") == [2]
    assert xattn.pipeline_word_tokens(built("sd3"), "a red circle", "circle") == [3, 77 + 2]  # CLIP, then T5
    assert xattn.pipeline_word_tokens(built("sd3-no-t5"), "a red circle", "circle") == [3]
    with pytest.raises(ValueError, match="'square' is not a word of the prompt 'a red circle'; its words are: a, red, circle"):
        xattn.pipeline_word_tokens(built("flux"), "a red circle", "square")


def test_the_word_map_reads_the_words_positions_in_both_streams():
    pipe = built("sd3")
    with xattn.trace(pipe) as tc:
        draw(pipe, PROMPTS[:1], [0])
    tokens = tc.token_maps(image=0)
    circle = tc.word_maps(["circle"], normalise="none")["circle"]
    assert np.allclose(circle, tokens[[3, 79]].mean(0).numpy(), atol=1e-7)


def test_what_xattn_cannot_handle_is_refused_by_name():
    with pytest.raises(TypeError, match="does not know the denoiser AutoencoderKL; it supports UNets"):
        with attach(built("sd3").vae, Controller()):
            pass
    class CrossOnly(Controller):
        """A user's controller that reads cross-attention only (every one of xattn's own understands joint sites)."""

        joint = False

    with pytest.raises(TypeError, match="CrossOnly works on cross-attention layers; SD3Transformer2DModel has joint"):
        with attach(built("sd3"), CrossOnly()):
            pass
    assert not hasattr(denoiser(built("sd3")), "_xattn_attached")


def test_sizes_follow_each_family():
    assert (native_side(built("sd3")), side_multiple(built("sd3"))) == (32, 4)  # 16-latent, VAE 2x, patch 2
    assert (native_side(built("flux")), side_multiple(built("flux"))) == (256, 4)  # default_sample_size 128, packed 2x2
    assert (native_side(built("pixart")), side_multiple(built("pixart"))) == (32, 4)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_the_maps_command_a_batch_maps_job_and_the_inspect_tab_take_a_transformer_model(name, tmp_path):
    built(name).save_pretrained(tmp_path / "model")
    result = run_cli("maps", "a red circle", "--model", str(tmp_path / "model"), "--words", "circle", "--size", "32",
                     "--steps", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    circle = np.load(tmp_path / "out" / "maps.npz")["circle"]
    assert circle.shape == (32, 32) and np.isfinite(circle).all() and circle.max() == 1.0
    (tmp_path / "jobs.jsonl").write_text('{"kind": "maps", "prompt": "a blue square", "words": ["square"], "steps": 2, "id": "j"}\n')
    result = run_cli("batch", str(tmp_path / "jobs.jsonl"), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "batch"))
    assert result.returncode == 0, result.stderr
    assert np.isfinite(np.load(next((tmp_path / "batch").rglob("maps.npz")))["square"]).all()
    if name == "sd3":  # the Flux folder's own size is 256 px: the tab draws at the model's size
        handlers = Handlers(built(name), "tiny")
        image, gallery = handlers.inspect("a red circle", 0, 2, 5.0, handlers.resolutions(), 1, 2)
        assert [label for _, label in gallery] == ["a", "red", "circle"] and handlers.resolutions() == [8]


def test_joint_blocks_come_from_the_log_sum_exp_over_all_keys():
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 3, 40, 8) for _ in range(3))
    out, lse = attention_and_logsumexp(query, key, value, None, 8 ** -0.5)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(query, key, value))  # the fused kernel's own output
    assert torch.allclose(lse, logsumexp_scores(query, key, None, 8 ** -0.5, chunk=7), atol=1e-5)
    full = ((query @ key.transpose(-1, -2)) * 8 ** -0.5).softmax(-1)
    block = probs_block(query[:, :, 10:], key[:, :, :10], lse[:, :, 10:], 8 ** -0.5)
    assert torch.allclose(block, full[:, :, 10:, :10], atol=1e-6)
    mask = torch.zeros(2, 1, 1, 40)
    mask[..., 30:] = -torch.inf  # keys masked out weigh nothing in the normaliser
    assert torch.allclose(logsumexp_scores(query, key, mask, 8 ** -0.5, chunk=7), logsumexp_scores(query, key[:, :, :30], None, 8 ** -0.5), atol=1e-5)


def test_selections_by_block_and_stream_list_what_exists():
    pipe = built("flux")
    with xattn.trace(pipe, per_layer=True) as tc:
        draw(pipe, PROMPTS[:1], [0])
    single = tc.token_maps(streams=["single"])
    first = tc.token_maps(blocks=[0])  # transformer_blocks.0 and single_transformer_blocks.0
    assert single.shape == first.shape == tc.token_maps().shape and not torch.allclose(single, first)
    assert [k.layer for k, _, _ in tc.store.select(streams=["double"], blocks=[1])] == ["transformer_blocks.1.attn"]
    with pytest.raises(ValueError, match=r"no recorded layer is in block \[7\]; recorded blocks: \[0, 1\]"):
        tc.token_maps(blocks=[7])
    with pytest.raises(ValueError, match=r"recorded streams: \['double', 'single'\]"):
        tc.token_maps(streams=["triple"])
    with pytest.raises(ValueError, match="lies beyond the 8 text tokens the model read"):
        with xattn.trace(pipe) as short:
            draw(pipe, ["a red circle and a blue square and a green triangle"], [0], max_sequence_length=8)
        short.word_maps(["triangle"])


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_concept_maps_leave_the_image_as_it_was_and_share_each_token(name):
    pipe = built(name)
    stock = draw(pipe, PROMPTS, [0, 1])
    with xattn.trace(pipe, concepts=["circle", "triangle", "background"], concept_blocks=[0, 1]) as tc:
        traced = draw(pipe, PROMPTS, [0, 1])
    assert np.abs(traced - stock).max() <= 1e-5
    shares = tc.token_maps(image=1, kind="concept")  # (concepts, H, W), a softmax over the concepts at each token
    assert shares.shape == (3, 32, 48) and torch.allclose(shares.sum(0), torch.ones(32, 48), atol=1e-5)
    maps = tc.concept_maps(image=1)
    assert list(maps) == ["circle", "triangle", "background"] and all(np.isfinite(m).all() for m in maps.values())
    with pytest.raises(ValueError, match=r"no double-stream block \[9\]"):
        with xattn.trace(pipe, concepts=["circle"], concept_blocks=[9]):
            pass


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_concept_stream_of_the_prompts_own_tokens_is_the_text_stream(name):
    """Concepts attend over [concepts; image] with the text stream's weights: fed the whole encoded prompt, the concept
    stream must come out of every double-stream block exactly as the block's own text stream does."""
    pipe = built(name)
    model = denoiser(pipe)
    embeds = pipe.encode_prompt(prompt=["a red circle"], prompt_2=None, **({"prompt_3": None, "do_classifier_free_guidance": False}
                                                                          if name == "sd3" else {}))[0][0]
    stream = ConceptStream(embeds, [str(i) for i in range(embeds.shape[0])], blocks=[])
    texts, streams = [], []
    hooks = [block.register_forward_hook(lambda b, a, k, out: texts.append(out[0]), with_kwargs=True) for _, block in
             family_of(pipe).double_blocks(model)]
    with xattn.trace(pipe) as tc, stream.installed(pipe, tc.store, tc.state):
        tc.store.concepts = stream
        for _, block in family_of(pipe).double_blocks(model):
            hooks.append(block.register_forward_hook(lambda b, a, k, out: streams.append(stream.stream), with_kwargs=True))
        draw(pipe, ["a red circle"], [0], guidance_scale=1.0)
    for hook in hooks:
        hook.remove()
    compared = [(t, s) for t, s in zip(texts, streams) if t is not None]  # SD3's last block returns no text stream
    assert len(compared) >= 2 and all(torch.allclose(t, s, atol=1e-4) for t, s in compared)

