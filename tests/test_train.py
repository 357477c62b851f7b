import json
import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from shapes import MODEL_PATH
from shapes.train import attention_loss, main


def test_attention_loss_is_minus_log_share_inside_the_mask():
    probs = torch.tensor([[[0.2, 0.5, 0.3], [0.5, 0.25, 0.25], [0.6, 0.25, 0.15], [0.7, 0.0, 0.3]]])  # (B=1, N=4 (2x2), T=3)
    masks = torch.zeros(1, 1, 16, 16)
    masks[0, 0, :8, :8] = 1  # top-left quarter -> first cell of the 2x2 map
    words = torch.tensor([[[1, 2]]])
    weight = torch.ones(1, 1)
    share_1 = 0.5 / (0.5 + 0.25 + 0.25 + 0.0)
    share_2 = 0.3 / (0.3 + 0.25 + 0.15 + 0.3)
    expected = -(math.log(share_1) + math.log(share_2)) / 2
    assert attention_loss([probs], masks, words, weight).item() == pytest.approx(expected, rel=1e-6)
    assert attention_loss([probs], masks, words, torch.zeros(1, 1)).item() == 0.0


def test_short_training_writes_a_loadable_model_and_resumes(tmp_path):
    common = ["--out", str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--tokenizer", str(MODEL_PATH / "tokenizer"),
              "--vae-steps", "2", "--vae-full-steps", "1", "--scenes", "64", "--batch", "4", "--checkpoint-every", "2"]
    main([*common, "--steps", "2"])
    (work,) = [p for p in (tmp_path / "work").iterdir() if p.is_dir()]
    main([*common, "--steps", "2"])  # finished: nothing is redone
    steps = [json.loads(line)["step"] for line in (work / "train-log.jsonl").read_text().splitlines()]
    assert steps == [0]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
