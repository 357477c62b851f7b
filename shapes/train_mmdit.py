"""Train the embedded MM-DiT, an SD3-format model of the shapes world, from scratch on CPU.

    python -m shapes.train_mmdit [--out runs/mmdit] [--work runs/shapes] [--seed 0]

The shipped model (`shapes/mmdit`, `--model embedded-mmdit`) is this recipe's defaults with the embedded UNet model's
VAE and tokenizer: `python -m shapes.train_mmdit --vae shapes/model/vae --tokenizer shapes/model/tokenizer --out
shapes/mmdit` (shapes/MODEL_CARD.md).

Stages 1 and 2 are `shapes.train`'s: the VAE and the encoded scene set, cached under --work and shared with it.
Stage 3 trains `SD3Transformer2DModel` with two small CLIP text encoders in the roles of SD3's CLIP-L and CLIP-G
(no T5: `StableDiffusion3Pipeline` with `text_encoder_3=None` fills T5's 256 positions with zeros; the trainer
feeds one zero position whose keys count 256 times, which is exact, as the 256 are alike in every layer), by rectified flow as SD3 is trained: x_s = (1 - s) x0 + s e with s logit-normal, the model fed 1000 s and
asked for e - x0. Captions are dropped 10 % of the time for classifier-free guidance (in the second learning-rate
cycle less often from one-object scenes, `shapes.train.unconditional_weights`). As on the UNet, each object's words
are taught to put their attention on their object: here the image-query x caption-key block of every joint
attention layer, renormalised over the caption's tokens (`shapes.train.attention_loss`, `pixel_attention_loss`),
with the word-identity loss on the text states. The exported weights are the exponential moving averages, written
as a folder that `StableDiffusion3Pipeline.from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusion3Pipeline
from tqdm import tqdm

from shapes import architecture
from shapes.train import (RECIPE, Settings, add_arguments, attention_loss, build_dataset, identity_loss,
                          load_tokenizer, pixel_attention_loss, replace_folder, resume, save_checkpoint, train_vae,
                          unconditional_weights, update, word_classes)
from xattn.attach import attach
from xattn.controller import Controller, explicit_probs


@dataclass(frozen=True)
class MMDiTSettings(Settings):
    scenes: int = 20000
    steps: int = 14000  # 70 min on 2 cores; 6,400 steps drew 43 % of one-object prompts exactly, 14,000 drew 87 %
    rewarm_steps: int = 4000
    lr: float = 5e-4


MMDIT_RECIPE = 2  # bump when the transformer's architecture or initialisation changes: it names the run folder
ZERO_POSITIONS = 256  # the T5 positions StableDiffusion3Pipeline fills with zeros (its max_sequence_length)


class SupervisedJointAttention(Controller):
    """Joint attention computed explicitly, the one zero position's keys weighed as ZERO_POSITIONS alike, handing each
    layer's image x caption block (renormalised over the caption's tokens, head-averaged) to the attention losses."""

    def __init__(self, caption_tokens: int) -> None:
        self.caption_tokens = caption_tokens
        self.sink: list[torch.Tensor] = []

    def handles(self, site) -> bool:
        return site.kind == "joint"

    def attend(self, site, query, key, value, mask):
        copies = torch.zeros(key.shape[2])
        copies[site.text.start + self.caption_tokens] = math.log(ZERO_POSITIONS)
        probs = explicit_probs(query, key, copies.to(query), site.scale)
        caption = slice(site.text.start, site.text.start + self.caption_tokens)
        block = probs[:, :, site.image, caption].mean(1)
        self.sink.append(block / block.sum(-1, keepdim=True).clamp_min(1e-8))
        return probs.to(value.dtype) @ value


def encode(encoders, ids: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What StableDiffusion3Pipeline feeds the transformer for these token ids: both CLIPs' penultimate states side by
    side, then (standing for the absent T5's ZERO_POSITIONS) one zero position; the projected pooled vectors side by
    side. Also the states."""
    outputs = [encoder(ids, output_hidden_states=True) for encoder in encoders]
    states = torch.cat([o.hidden_states[-2] for o in outputs], -1)
    context = torch.cat([F.pad(states, (0, width - states.shape[-1])), states.new_zeros(ids.shape[0], 1, width)], 1)
    return context, torch.cat([o.text_embeds for o in outputs], -1), states


def train_transformer(settings: MMDiTSettings, work: Path, data: dict[str, torch.Tensor], shift: float, scaling: float, tokenizer):
    """Stage 3: the transformer and both text encoders; returns them with their EMA weights."""
    torch.manual_seed(settings.seed)
    transformer = architecture.build_mmdit()
    encoders = [architecture.build_projected_text_encoder(), architecture.build_projected_text_encoder()]
    width = transformer.config.joint_attention_dim
    length = architecture.CAPTION_TOKENS
    classes = word_classes(data["ids"][:, :length], (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id))
    identity = torch.nn.Linear(2 * architecture.TEXT_WIDTH, int(classes.max()) + 1, bias=False)
    modules = torch.nn.ModuleDict({"transformer": transformer, "text_encoder": encoders[0], "text_encoder_2": encoders[1], "identity": identity})
    opt = torch.optim.AdamW(modules.parameters(), lr=settings.lr, weight_decay=1e-2, fused=True)
    params = dict(modules.named_parameters())
    ema = {k: v.detach().clone() for k, v in params.items()}
    ckpt = work / "mmdit.safetensors"
    start = resume(modules, ema, opt, ckpt)
    supervised = SupervisedJointAttention(length)
    second_cycle_dropout = settings.caption_dropout * unconditional_weights(data["valid"], settings.uncond_one_object_weight)
    empty = torch.tensor(tokenizer("", padding="max_length", max_length=length).input_ids)
    n = data["latents"].shape[0]
    log = open(work / "train-log.jsonl", "a")
    began = time.time()
    with attach(transformer, supervised):
        for step in tqdm(range(start, settings.steps), desc="mmdit", initial=start, total=settings.steps, mininterval=5):
            index = torch.randint(0, n, (settings.batch,))
            x0 = (data["latents"][index] - shift) * scaling
            ids = data["ids"][index, :length].long()
            dropout = settings.caption_dropout if step < settings.first_cycle_steps else second_cycle_dropout[index]
            dropped = torch.rand(settings.batch) < dropout
            ids[dropped] = empty
            noise = torch.randn_like(x0)
            sigma = torch.sigmoid(torch.randn(settings.batch))[:, None, None, None]  # SD3's logit-normal noise levels
            context, pooled, states = encode(encoders, ids, width)
            supervised.sink.clear()
            predicted = transformer(hidden_states=(1 - sigma) * x0 + sigma * noise, timestep=1000 * sigma.flatten(),
                                    encoder_hidden_states=context, pooled_projections=pooled, return_dict=False)[0]
            denoise = F.mse_loss(predicted, noise - x0)
            objects = (data["valid"][index] & ~dropped[:, None, None]).float()
            masks, words = data["masks"][index], data["words"][index]
            attend = attention_loss(supervised.sink, masks, words, objects)
            pixels = pixel_attention_loss(supervised.sink, masks, words, objects)
            naming = identity_loss(states, classes[ids], identity.weight)
            loss = denoise + settings.attention_weight * attend + settings.pixel_weight * pixels + settings.identity_weight * naming
            lr = update(modules, opt, list(ema.values()), list(params.values()), loss, step, settings)
            if step % 50 == 0:
                log.write(json.dumps({"step": step, "denoise": denoise.item(), "attention": attend.item(), "pixels": pixels.item(),
                                      "identity": naming.item(), "lr": lr, "seconds": time.time() - began}) + "\n")
                log.flush()
            if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
                save_checkpoint(modules, ema, opt, step + 1, ckpt)
    log.close()
    with torch.no_grad():
        for name, value in ema.items():
            params[name].copy_(value)
    return transformer.eval(), [e.eval() for e in encoders]


def export(out: Path, vae, transformer, encoders, tokenizer, shift: float, scaling: float) -> None:
    """Write the folder `StableDiffusion3Pipeline.from_pretrained` loads (transformer and VAE in fp16), atomically."""
    vae.register_to_config(scaling_factor=scaling, shift_factor=shift)
    tokenizer.model_max_length = architecture.CAPTION_TOKENS
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=architecture.flow_scheduler(), vae=vae,
                                    text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    tmp = out.with_name(out.name + ".tmp")
    transformer.half(), vae.half()
    pipe.save_pretrained(tmp, safe_serialization=True)
    transformer.float(), vae.float()
    replace_folder(tmp, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, MMDiTSettings(), "runs/mmdit")
    parser.add_argument("--vae", type=Path, help="an already trained VAE folder (e.g. shapes/model/vae, the embedded model's) instead of stage 1")
    args = parser.parse_args(argv)
    settings = MMDiTSettings(**{k: getattr(args, k) for k in asdict(MMDiTSettings())})
    work = args.work / f"mmdit-v{RECIPE}.{MMDIT_RECIPE}-{settings.digest()}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(asdict(settings), indent=2))
    began = time.time()
    tokenizer = load_tokenizer(work, args.wheel, args.tokenizer)
    vae = AutoencoderKL.from_pretrained(args.vae).float().eval() if args.vae else train_vae(settings, args.work)
    cache = args.work / "given-vae" if args.vae else args.work  # scenes encoded by another VAE are other data
    cache.mkdir(parents=True, exist_ok=True)
    data = build_dataset(settings, cache, vae, tokenizer)
    shift, scaling = float(data["latents"].mean()), float(1.0 / data["latents"].std())
    transformer, encoders = train_transformer(settings, work, data, shift, scaling, tokenizer)
    export(args.out, vae, transformer, encoders, tokenizer, shift, scaling)
    minutes = (time.time() - began) / 60
    (work / "done.json").write_text(json.dumps({"minutes_this_run": minutes, "out": str(args.out)}))
    print(f"wrote {args.out} ({minutes:.1f} min in this run; checkpoints in {work})")


if __name__ == "__main__":
    main()
