import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

import xattn
from benchmarks.shapes_quality import shape_word_peaks, prompt_sets
from pipelines.loading import load_pipeline, model_label, resolve_model
from shapes import COLOURS, MMDIT_PATH, MODEL_PATH, SHAPES, match_caption


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


def test_embedded_model_is_a_standard_sd_folder(pipe):
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.dtype == torch.float32
    cross = {name for name in pipe.unet.attn_processors if "attn2" in name}
    blocks = {name.split(".attentions")[0] for name in cross}
    assert len(cross) >= 4 and len(blocks) >= 3  # cross-attention at 16x16, 8x8 and 4x4
    size = sum(p.stat().st_size for p in MODEL_PATH.rglob("*") if p.is_file())
    assert size < 40e6


def test_same_seed_same_image_and_different_seed_different(pipe):
    def run(seed):
        return pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]

    first, again, other = run(3), run(3), run(4)
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 0.1


def test_one_object_prompts_come_out_exactly(pipe):
    """The shipped model draws the asked colour and shape, once (full figures: benchmarks/RESULTS.md)."""
    prompts = [f"a {c} {s}" for c in COLOURS for s in SHAPES] * 2
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=generators, output_type="np").images
    exact = [match_caption(np.rint(image * 255), prompt).exact for prompt, image in zip(prompts, images)]
    assert np.mean(exact) >= 0.75  # 100 % with the shipped model (30 of 30); before the zero-SNR and word-identity recipe: about 20 %


def test_missing_model_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder at ./nowhere"):
        resolve_model("./nowhere")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        resolve_model(str(tmp_path))
    assert resolve_model(None) == str(MODEL_PATH)
    assert resolve_model("owner/name") == "owner/name"


def test_shape_word_maps_peak_inside_their_objects(pipe):
    prompts = prompt_sets(40)["two objects"]
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    with xattn.trace(pipe) as tc:
        images = pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=generators, output_type="np").images
    peaks = []
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        peaks += shape_word_peaks(pipe, prompt, tc.token_maps(image=i), match_caption(np.rint(image * 255), prompt))
    # an object covers about a tenth of the image, so a capture that lost the word-to-map link would
    # score near 0.1; issue 3's bar is 85 % (95 % on the 200 two-object seeds of benchmarks/RESULTS.md,
    # so about 4 standard errors of 60 objects above the bar)
    assert len(peaks) >= 60 and np.mean(peaks) >= 0.85


def test_embedded_mmdit_is_a_standard_sd3_folder_that_draws_the_world():
    """`--model embedded-mmdit`: an SD3 pipeline without T5 that draws one-object prompts (87 % exact at 100 seeds a row,
    benchmarks/RESULTS.md) and whose shape words' joint-attention maps peak inside their objects."""
    mmdit = load_pipeline("embedded-mmdit")
    assert isinstance(mmdit, StableDiffusion3Pipeline) and mmdit.text_encoder_3 is None
    assert resolve_model("embedded-mmdit") == str(MMDIT_PATH) and model_label("embedded-mmdit") == "embedded-mmdit"
    mmdit.set_progress_bar_config(disable=True)
    prompts = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    with xattn.trace(mmdit) as tc:
        images = mmdit(prompts, num_inference_steps=25, guidance_scale=5.0, generator=generators, output_type="np").images
    verdicts = [match_caption(np.rint(image * 255), prompt) for prompt, image in zip(prompts, images)]
    assert np.mean([v.exact for v in verdicts]) >= 0.6
    peaks = [peak for i, (prompt, v) in enumerate(zip(prompts, verdicts)) if v.exact
             for peak in shape_word_peaks(mmdit, prompt, tc.token_maps(image=i), v)]
    assert peaks and np.mean(peaks) >= 0.9
