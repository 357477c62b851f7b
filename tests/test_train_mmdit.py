"""The embedded MM-DiT's trainer: the one zero position standing for SD3's absent T5 is exact, and a short run writes a
folder that xattn loads and traces."""

import json

import numpy as np
import torch

import xattn
from pipelines.loading import load_pipeline
from shapes import MODEL_PATH, architecture
from shapes.train_mmdit import ZERO_POSITIONS, SupervisedJointAttention, encode, main
from transformers import CLIPTokenizer
from xattn.attach import attach


def test_the_mmdit_starts_adaln_zero():
    """Every block's modulation and the output layer start at zero: each block is the identity, the prediction 0."""
    transformer = architecture.build_mmdit().eval()
    with torch.no_grad():
        out = transformer(hidden_states=torch.randn(1, 4, 16, 16), timestep=torch.tensor([500.0]),
                          encoder_hidden_states=torch.randn(1, 25, transformer.config.joint_attention_dim),
                          pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim), return_dict=False)[0]
    assert torch.equal(out, torch.zeros_like(out))
    assert not transformer.transformer_blocks[0].norm1.linear.weight.any()


def test_one_zero_position_weighed_as_many_is_the_pipelines_zero_positions():
    torch.manual_seed(0)
    transformer = architecture.build_mmdit().eval()
    with torch.no_grad():
        for param in transformer.parameters():
            if not param.any():
                param.normal_(0, 0.02)  # adaLN-Zero starts every block as the identity: give the blocks work to do
    encoders = [architecture.build_projected_text_encoder().eval() for _ in range(2)]
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_PATH / "tokenizer")
    ids = torch.tensor([tokenizer("a red circle", padding="max_length", max_length=architecture.CAPTION_TOKENS).input_ids])
    latents, sigma = torch.randn(1, 4, 16, 16), torch.tensor([600.0])
    with torch.no_grad():
        context, pooled, _ = encode(encoders, ids, transformer.config.joint_attention_dim)
        caption = context[:, : architecture.CAPTION_TOKENS]
        full = torch.cat([caption, caption.new_zeros(1, ZERO_POSITIONS, caption.shape[-1])], 1)  # what the pipeline feeds
        stock = transformer(hidden_states=latents, timestep=sigma, encoder_hidden_states=full, pooled_projections=pooled, return_dict=False)[0]
        with attach(transformer, SupervisedJointAttention(architecture.CAPTION_TOKENS)):
            trained = transformer(hidden_states=latents, timestep=sigma, encoder_hidden_states=context, pooled_projections=pooled,
                                  return_dict=False)[0]
    assert torch.allclose(trained, stock, atol=1e-5) and not torch.allclose(stock, torch.zeros_like(stock))


def test_short_training_writes_an_sd3_folder_that_xattn_loads_and_traces(tmp_path):
    common = ["--out", str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--tokenizer", str(MODEL_PATH / "tokenizer"),
              "--vae-steps", "2", "--vae-full-steps", "1", "--scenes", "64", "--batch", "4", "--checkpoint-every", "2",
              "--rewarm-steps", "1", "--warmup", "1"]
    main([*common, "--steps", "2"])
    (work,) = [p for p in (tmp_path / "work").iterdir() if p.is_dir() and p.name.startswith("mmdit")]
    main([*common, "--steps", "2"])  # finished: nothing is redone
    logged = [json.loads(line) for line in (work / "train-log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [0] and all(np.isfinite(v) for v in logged[0].values())
    pipe = load_pipeline(tmp_path / "model")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None and pipe.tokenizer_max_length == 24
    with xattn.trace(pipe) as tc:
        image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert tc.word_maps(["circle"])["circle"].shape == (64, 64)
