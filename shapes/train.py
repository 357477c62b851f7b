"""Train the embedded shapes model from scratch on CPU and write it as a diffusers folder.

    python -m shapes.train [--out runs/model] [--work runs/shapes] [--seed 0]

It writes to runs/model unless told otherwise: replacing the shipped model is a deliberate
`--out shapes/model`.

Stages, each checkpointed under --work so a killed run resumes where it stopped:
1. the VAE (64 px -> 16x16x4 latents), on rendered scenes (mostly 32 px crops);
2. a fixed data set of scenes, encoded to latents once, with per-object masks and word positions;
3. the UNet and CLIP text encoder together: the v-prediction loss on a zero-terminal-SNR
   schedule (captions dropped 10 % of the time for classifier-free guidance; in the second
   learning-rate cycle less often from one-object scenes, see `unconditional_weights`) plus
   three auxiliary losses. A supervision of cross-attention: each object's colour, shape and place word should put
   its attention inside that object (loss -log of the share of the word's attention that falls in its
   mask); without it every word of a tiny model attends to every object alike, and per-word maps
   and Prompt-to-Prompt edits mean nothing. Its pixel-side twin (`pixel_attention_loss`): the
   background attends little to object words, an object's pixels to their own object's words.
   And a word-identity loss: each caption token's output
   state must name its own word (see `identity_loss`); without it the supervision turns each
   shape word into a copy of its colour word and the model ignores shape words.
The exported weights are the UNet's and text encoder's exponential moving averages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import CLIPTokenizer

from shapes import architecture
from shapes.scenes import BACKGROUND, IMAGE_SIZE, make_scene
from shapes.tokenizer import build_tokenizer, download_wheel, read_bpe_from_wheel

MAX_OBJECTS = 3
RECIPE = 2  # bump when the scenes, the stored fields or the losses change: it names the data cache and the run folder


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    vae_steps: int = 1200
    vae_full_steps: int = 200
    vae_batch: int = 16
    vae_lr: float = 2e-3
    scenes: int = 40000
    steps: int = 6400
    batch: int = 32
    lr: float = 8e-4
    warmup: int = 200
    rewarm_steps: int = 2400
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    uncond_one_object_weight: float = 0.4
    attention_weight: float = 0.5
    pixel_weight: float = 0.5
    identity_weight: float = 0.2
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        if not 0 <= self.rewarm_steps < self.steps:
            raise ValueError(f"rewarm_steps ({self.rewarm_steps}) must lie in [0, steps) (steps: {self.steps}); 0 runs one cosine")
        if self.uncond_one_object_weight < 0:
            raise ValueError(f"uncond_one_object_weight ({self.uncond_one_object_weight}) must be >= 0; 1 drops every scene's caption alike")

    @property
    def first_cycle_steps(self) -> int:
        """Steps of the first learning-rate cycle; the second cycle is the rest."""
        return self.steps - self.rewarm_steps

    def digest(self, *fields: str) -> str:
        """Hash of the named settings (all when none are named): the cache key of a stage."""
        chosen = {k: v for k, v in asdict(self).items() if not fields or k in fields}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]


VAE_FIELDS = ("seed", "vae_steps", "vae_full_steps", "vae_batch", "vae_lr")


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(settings: Settings, work: Path) -> torch.nn.Module:
    """Stage 1: an autoencoder that reconstructs flat shapes with sharp edges.

    Most steps see random 32 px crops (the VAE is convolutional, and a crop costs a quarter of a
    full image), the last `vae_full_steps` see whole 64 px scenes so the mid-block attention and
    norms settle at the real size. The L1 loss weighs object pixels 5x, else the background
    dominates it; the posterior's log-variance starts at -10 so sampling noise does not drown the
    latents while the encoder is still weak (the KL weight is SD's tiny 1e-6).
    """
    torch.manual_seed(settings.seed)
    vae = architecture.build_vae()
    final = work / f"vae-{settings.digest(*VAE_FIELDS)}.safetensors"
    if final.exists():
        vae.load_state_dict(load_file(str(final)))
        return vae.eval()
    rng = np.random.default_rng(settings.seed)
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = -10.0
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    background = images_to_tensor(np.asarray(BACKGROUND, np.uint8)[None, None, None])
    total = settings.vae_steps + settings.vae_full_steps
    seed_base = 10_000_000
    for step in tqdm(range(total), desc="vae", mininterval=5):
        seeds = range(seed_base + step * settings.vae_batch, seed_base + (step + 1) * settings.vae_batch)
        x = images_to_tensor(np.stack([make_scene(s).image for s in seeds]))
        if step < settings.vae_steps:
            top, left = rng.integers(0, IMAGE_SIZE // 2 + 1, 2)
            x = x[:, :, top : top + IMAGE_SIZE // 2, left : left + IMAGE_SIZE // 2]
        posterior = vae.encode(x).latent_dist
        weight = 1 + 4 * ((x - background).abs().amax(1, keepdim=True) > 0.05).float()
        loss = ((vae.decode(posterior.sample()).sample - x).abs() * weight).mean() + 1e-6 * posterior.kl().mean()
        lr = settings.vae_lr * (0.05 + 0.475 * (1 + math.cos(math.pi * step / total)))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    save_atomic(vae.state_dict(), final)
    return vae.eval()


def word_positions(tokenizer: CLIPTokenizer, scene) -> list[tuple[int, int, int]]:
    """Token index of each object's colour, shape and place word in the scene's caption (-1: no place word).

    An object's place word is its own absolute place ("on the left"), or for the subject of a
    relation ("a red circle above a blue square") the relation word. CLIP's text encoder is
    causal, so the colour and shape words cannot see a place word that follows them: unless the
    place word's own attention lands on its object, the model cannot tie the place to it.
    """
    words = [tokenizer.decode([i]).strip() for i in tokenizer(scene.caption).input_ids]
    used: set[int] = set()

    def claim(word: str, after: int) -> int:
        """The first index past `after` that holds `word` and no earlier object claimed."""
        index = next(i for i, w in enumerate(words) if w == word and i > after and i not in used)
        used.add(index)
        return index

    layout, positions = scene.layout, []
    for k, thing in enumerate(layout.things):
        colour = claim(thing.colour, -1)
        shape = claim(thing.shape, colour)
        place = layout.place[k]
        if place is None and layout.relation is not None and layout.relation[0] == k:
            place = layout.relation[1]
        positions.append((colour, shape, -1 if place is None else claim(place, shape)))
    return positions


def build_dataset(settings: Settings, work: Path, vae, tokenizer: CLIPTokenizer) -> dict[str, torch.Tensor]:
    """Stage 2: scenes as latents, token ids, per-object 16x16 masks and word positions (cached)."""
    path = work / f"data-v{RECIPE}-{settings.digest(*VAE_FIELDS, 'scenes')}.safetensors"
    if path.exists():
        return load_file(str(path))
    n = settings.scenes
    ids = torch.full((n, tokenizer.model_max_length), tokenizer.pad_token_id, dtype=torch.int32)
    masks = torch.zeros(n, MAX_OBJECTS, architecture.LATENT_SIZE, architecture.LATENT_SIZE)
    words = torch.zeros(n, MAX_OBJECTS, 3, dtype=torch.int64)
    valid = torch.zeros(n, MAX_OBJECTS, 3, dtype=torch.bool)
    latents = torch.zeros(n, 4, architecture.LATENT_SIZE, architecture.LATENT_SIZE)
    chunk = 256
    factor = IMAGE_SIZE // architecture.LATENT_SIZE
    for start in tqdm(range(0, n, chunk), desc="data", mininterval=5):
        scenes = [make_scene(s) for s in range(start, min(start + chunk, n))]
        with torch.no_grad():
            latents[start : start + len(scenes)] = vae.encode(images_to_tensor(np.stack([s.image for s in scenes]))).latent_dist.mean
        for offset, scene in enumerate(scenes):
            i = start + offset
            tokens = tokenizer(scene.caption, padding="max_length", max_length=tokenizer.model_max_length).input_ids
            ids[i] = torch.tensor(tokens, dtype=torch.int32)
            for k, (obj, found) in enumerate(zip(scene.objects, word_positions(tokenizer, scene))):
                full = torch.from_numpy(obj.mask.astype(np.float32))[None, None]
                masks[i, k] = F.max_pool2d(full, factor)[0, 0]
                found = torch.tensor(found)
                words[i, k], valid[i, k] = found.clamp_min(0), found >= 0
    data = {"latents": latents, "ids": ids, "masks": masks, "words": words, "valid": valid}
    save_atomic(data, path)
    return data


class SupervisedCrossAttention:
    """Plain attention that also hands its head-averaged probabilities to the trainer's loss."""

    def __init__(self, sink: list[torch.Tensor]):
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)
        self.sink.append(probs.view(batch, attn.heads, *probs.shape[1:]).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def word_columns(probs: torch.Tensor, masks: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's view for both attention losses: the object masks at its resolution (B, K, N)
    and the attention columns of each object's words (B, N, K, W)."""
    layer_masks = F.adaptive_max_pool2d(masks, math.isqrt(probs.shape[1])).flatten(2)
    index = words.flatten(1)[:, None, :].expand(-1, probs.shape[1], -1)
    return layer_masks, probs.gather(2, index).unflatten(2, words.shape[1:])


def attention_loss(maps: list[torch.Tensor], masks: torch.Tensor, words: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over layers and supervised words of -log(share of the word's attention inside its object).

    maps: per layer (B, N, T) probabilities; masks: (B, K, 16, 16); words: (B, K, W) token
    positions of each object's words; weight: (B, K, W), 0 for a word not supervised.
    """
    total = maps[0].new_zeros(())
    for probs in maps:
        layer_masks, columns = word_columns(probs, masks, words)
        word_maps = columns.permute(0, 2, 3, 1)
        inside = (word_maps * layer_masks[:, :, None, :]).sum(-1)
        share = inside / word_maps.sum(-1).clamp_min(1e-8)
        total = total + (-torch.log(share.clamp_min(1e-6)) * weight).sum() / weight.sum().clamp_min(1)
    return total / len(maps)


def pixel_attention_loss(maps: list[torch.Tensor], masks: torch.Tensor, words: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over layers of two terms on each pixel's distribution over tokens (the softmax side).

    Background pixels (outside every supervised object) should give little attention to object
    words: -log(1 - their object-word share). An object's pixels should give their object-word
    attention to their own object's words: -log(own share / object-word share).
    `attention_loss` asks where each word's attention goes; this asks what each pixel attends to,
    weighing every pixel alike, and so discourages a second copy of an object. Shapes as in
    `attention_loss`.
    """
    total = maps[0].new_zeros(())
    present = (weight.sum(-1) > 0).float()
    for probs in maps:
        layer_masks, columns = word_columns(probs, masks, words)
        layer_masks = layer_masks * present[..., None]
        own = (columns * weight[:, None]).sum(-1)
        named = own.sum(-1)
        background = (1 - layer_masks.amax(1)) * (present.sum(-1, keepdim=True) > 0).float()
        total = total + (-torch.log((1 - named).clamp_min(1e-6)) * background).sum() / background.sum().clamp_min(1)
        inside = layer_masks.transpose(1, 2)
        share = own / named[..., None].clamp_min(1e-8)
        total = total + (-torch.log(share.clamp_min(1e-6)) * inside).sum() / inside.sum().clamp_min(1)
    return total / len(maps)


LR_FLOOR = 0.1  # both cycles end at this fraction of the peak rate
REWARM_TOP = 0.3  # the second cycle starts here, about where one cosine over the whole run would be


def learning_rate(step: int, settings: Settings) -> float:
    """Warm-up, then a cosine from 1x to 0.1x over the first `steps - rewarm_steps` steps, then a
    second, lower cosine from 0.3x to 0.1x over the last `rewarm_steps` (none when it is 0).

    On the shapes model a second low-rate phase after the first reaches its floor measured +7 to +10
    points of two-object prompts drawn exactly, where stretching one cosine over as many steps
    measured none (benchmarks/RESULTS.md).
    """
    first = settings.first_cycle_steps
    if step < first:
        top, phase = 1.0, step / first
    else:
        top, phase = REWARM_TOP, (step - first) / settings.rewarm_steps
    scale = LR_FLOOR + (top - LR_FLOOR) * (1 + math.cos(math.pi * phase)) / 2
    return settings.lr * min(1.0, (step + 1) / settings.warmup) * scale


IDENTITY_SCALE = 10.0


def identity_loss(states: torch.Tensor, targets: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a cosine classifier that names each token's word from its output state.

    states: (B, T, D) text-encoder outputs; targets: (B, T) word classes, -100 where ignored;
    prototypes: (C, D), one per word. Cosine logits at a fixed scale cannot be satisfied by
    growing the classifier's weights: the states themselves must point at their own word's
    prototype more than at any other's, so the shape word keeps its identity while the
    attention supervision pulls it toward its object.
    """
    logits = IDENTITY_SCALE * F.normalize(states, dim=-1) @ F.normalize(prototypes, dim=-1).T
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def word_classes(ids: torch.Tensor, special: tuple[int, ...]) -> torch.Tensor:
    """A lookup from token id to word class over the words the captions use; -100 for the rest."""
    words = [int(i) for i in torch.unique(ids) if int(i) not in special]
    lookup = torch.full((int(ids.max()) + 1,), -100, dtype=torch.int64)
    lookup[torch.tensor(words)] = torch.arange(len(words))
    return lookup


def unconditional_weights(valid: torch.Tensor, one_object_weight: float) -> torch.Tensor:
    """How often each scene loses its caption in the second cycle, relative to the mean: one-object
    scenes `one_object_weight` times as often as the others, so the mean rate stays the set one.

    valid: (N, K, 3) the data set's word flags (an object's colour word is always there).
    Classifier-free guidance extrapolates away from the unconditional prediction. Trained on every
    scene alike, that prediction expects 1.8 objects (the data's 35 / 50 / 15 % mix), fewer than a
    two-object caption names, so guidance pushes such a caption toward a third object, a copy of
    one it names: the model's commonest failure. With one-object scenes at 0.4 it expects 2.0.
    Without them (2.2) guidance pushed one-object captions the other way, to an empty picture.
    """
    weight = torch.where(valid[:, :, 0].sum(1) == 1, one_object_weight, 1.0)
    return weight / weight.mean()


def optimizer_state_of(weights: Path, optimizer: Path) -> dict:
    """The optimizer state, step and random state saved with the weights in `weights`.

    A checkpoint is two files: the optimizer state goes to `optimizer.pt.tmp`, the weights (their
    step in the metadata) replace the old ones atomically, then the optimizer state is renamed into
    place. A run killed between the last two left weights a checkpoint ahead of `optimizer.pt`;
    their own optimizer state is the pending `.tmp`, and the rename is finished here.
    """
    with safe_open(str(weights), "pt") as f:
        saved = (f.metadata() or {}).get("step")
    state = torch.load(optimizer, weights_only=True)
    if saved is None or int(state["step"]) == int(saved):
        return state
    pending = optimizer.with_name(optimizer.name + ".tmp")
    if pending.exists():
        pending_state = torch.load(pending, weights_only=True)
        if int(pending_state["step"]) == int(saved):
            os.replace(pending, optimizer)
            return pending_state
    raise RuntimeError(
        f"the checkpoint in {weights.parent} does not hold together: weights at step {saved}, optimizer state at step "
        f"{state['step']} and no pending optimizer state for step {saved}; delete the folder to train from the start"
    )


def resume(modules: torch.nn.Module, ema: dict[str, torch.Tensor], opt: torch.optim.Optimizer, ckpt: Path) -> int:
    """Load a checkpoint's weights, moving averages, optimizer and random state (its optimizer state beside it in
    optimizer.pt); the step to go on from, 0 when there is none."""
    if not ckpt.exists():
        return 0
    saved = load_file(str(ckpt))
    modules.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")})
    for name, value in saved.items():
        if name.startswith("ema."):
            ema[name[4:]].copy_(value)
    state = optimizer_state_of(ckpt, ckpt.parent / "optimizer.pt")
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def save_checkpoint(modules: torch.nn.Module, ema: dict[str, torch.Tensor], opt: torch.optim.Optimizer, step: int, ckpt: Path) -> None:
    """The two-file checkpoint `optimizer_state_of` reads back: optimizer state pending, weights atomically, then the rename."""
    state = {f"model.{k}": v for k, v in modules.state_dict().items()} | {f"ema.{k}": v for k, v in ema.items()}
    pending = ckpt.parent / "optimizer.pt.tmp"
    torch.save({"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": step}, pending)
    save_atomic(state, ckpt, {"step": str(step)})
    os.replace(pending, ckpt.parent / "optimizer.pt")


def update(modules: torch.nn.Module, opt: torch.optim.Optimizer, ema: list[torch.Tensor], params: list[torch.Tensor],
           loss: torch.Tensor, step: int, settings: Settings) -> float:
    """One optimiser step at the scheduled rate (gradients clipped to norm 1), then the moving averages (copies of the
    weights until the warm-up ends); the rate."""
    lr = learning_rate(step, settings)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1.0 if step < settings.warmup else 1 - settings.ema_decay)
    return lr


def replace_folder(tmp: Path, out: Path) -> None:
    """`out` becomes the fully written folder `tmp`."""
    if out.exists():
        for path in sorted(out.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        out.rmdir()
    os.replace(tmp, out)


def add_arguments(parser: argparse.ArgumentParser, defaults, out: str) -> None:
    """The trainers' command line: folders, tokenizer sources, and one option per setting."""
    parser.add_argument("--out", type=Path, default=Path(out), help="diffusers folder to write")
    parser.add_argument("--work", type=Path, default=Path("runs/shapes"), help="checkpoints and caches (resume from here)")
    parser.add_argument("--wheel", type=Path, help="open_clip_torch wheel for the tokenizer (downloaded when absent)")
    parser.add_argument("--tokenizer", type=Path, help="an already built CLIP tokenizer folder (e.g. shapes/model/tokenizer)")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)


def train_denoiser(settings: Settings, work: Path, data: dict[str, torch.Tensor], scaling: float, tokenizer: CLIPTokenizer):
    """Stage 3: UNet + text encoder with attention supervision and word identity; returns the EMA-weighted modules.

    The step runs eagerly (0.64-0.74 s on two CPU cores, by machine). Not under `torch.compile`: with
    torch 2.13's Inductor on CPU, this UNet's whole-graph backward is wrong past its 4x4 up block's
    upsampler (the loss values agree, the gradients of every earlier layer are 14-46 % off float64,
    where eager is within 3e-6; `aot_eager` and each block compiled alone are right), and compiling
    only the blocks or the losses bought nothing over eager (benchmarks/RESULTS.md).
    """
    torch.manual_seed(settings.seed)
    unet, text_encoder = architecture.build_unet(), architecture.build_text_encoder()
    scheduler = architecture.train_scheduler()
    sink: list[torch.Tensor] = []
    stock = unet.attn_processors
    unet.set_attn_processor({name: SupervisedCrossAttention(sink) if "attn2" in name else proc for name, proc in stock.items()})
    unet.to(memory_format=torch.channels_last)  # about 15 % faster convolutions on CPU
    classes = word_classes(data["ids"], (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id))
    identity = torch.nn.Linear(architecture.TEXT_WIDTH, int(classes.max()) + 1, bias=False)
    modules = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder, "identity": identity})
    opt = torch.optim.AdamW(modules.parameters(), lr=settings.lr, weight_decay=1e-2, fused=True)
    params = dict(modules.named_parameters())
    ema = {k: v.detach().clone() for k, v in params.items()}
    ema_list, param_list = list(ema.values()), list(params.values())
    ckpt = work / "denoiser.safetensors"
    start = resume(modules, ema, opt, ckpt)

    def losses(noisy, t, ids, velocity, masks, words, objects):
        sink.clear()
        states = text_encoder(ids)[0]
        denoise = F.mse_loss(unet(noisy, t, states).sample, velocity)
        return denoise, attention_loss(sink, masks, words, objects), pixel_attention_loss(sink, masks, words, objects), identity_loss(states, classes[ids], identity.weight)

    second_cycle_dropout = settings.caption_dropout * unconditional_weights(data["valid"], settings.uncond_one_object_weight)
    empty = torch.tensor(tokenizer("", padding="max_length", max_length=tokenizer.model_max_length).input_ids)
    n = data["latents"].shape[0]
    log = open(work / "train-log.jsonl", "a")
    bar = tqdm(range(start, settings.steps), desc="denoiser", initial=start, total=settings.steps, mininterval=5)
    began = time.time()
    for step in bar:
        index = torch.randint(0, n, (settings.batch,))
        latents = (data["latents"][index] * scaling).contiguous(memory_format=torch.channels_last)
        ids = data["ids"][index].long()
        dropout = settings.caption_dropout if step < settings.first_cycle_steps else second_cycle_dropout[index]
        dropped = torch.rand(settings.batch) < dropout
        ids[dropped] = empty
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (settings.batch,))
        noisy = scheduler.add_noise(latents, noise, t)
        objects = (data["valid"][index] & ~dropped[:, None, None]).float()
        denoise, attend, pixels, naming = losses(noisy, t, ids, scheduler.get_velocity(latents, noise, t), data["masks"][index], data["words"][index], objects)
        loss = denoise + settings.attention_weight * attend + settings.pixel_weight * pixels + settings.identity_weight * naming
        lr = update(modules, opt, ema_list, param_list, loss, step, settings)
        if step % 50 == 0:
            log.write(json.dumps({"step": step, "denoise": denoise.item(), "attention": attend.item(), "pixels": pixels.item(), "identity": naming.item(), "lr": lr, "seconds": time.time() - began}) + "\n")
            log.flush()
            bar.set_postfix(denoise=f"{denoise.item():.4f}", attention=f"{attend.item():.3f}", pixels=f"{pixels.item():.3f}", identity=f"{naming.item():.3f}")
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            save_checkpoint(modules, ema, opt, step + 1, ckpt)
    log.close()
    unet.set_attn_processor(dict(stock))
    with torch.no_grad():
        for name, value in ema.items():
            params[name].copy_(value)
    unet.to(memory_format=torch.contiguous_format)
    return unet.eval(), text_encoder.eval()


def export(out: Path, vae, unet, text_encoder, tokenizer: CLIPTokenizer, scaling: float) -> None:
    """Write the diffusers folder that StableDiffusionPipeline.from_pretrained loads.

    UNet and VAE are stored in fp16 (diffusers loads them as fp32); the text encoder stays fp32
    because transformers loads weights in their stored dtype and SD pipelines expect fp32 states.
    """
    vae.register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=architecture.sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    unet.half(), vae.half()
    pipe.save_pretrained(tmp, safe_serialization=True)
    unet.float(), vae.float()
    replace_folder(tmp, out)


def load_tokenizer(work: Path, wheel: Path | None, built: Path | None) -> CLIPTokenizer:
    """A tokenizer folder given with --tokenizer, else CLIP's built from the open_clip wheel (cached in work)."""
    if built is not None:
        return CLIPTokenizer.from_pretrained(built)
    folder = work / "tokenizer"
    if not folder.exists():
        source = wheel or download_wheel(work)
        build_tokenizer(read_bpe_from_wheel(source)).save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, Settings(), "runs/model")
    args = parser.parse_args(argv)
    settings = Settings(**{k: getattr(args, k) for k in asdict(Settings())})
    work = args.work / f"v{RECIPE}-{settings.digest()}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(asdict(settings), indent=2))
    began = time.time()
    tokenizer = load_tokenizer(work, args.wheel, args.tokenizer)
    vae = train_vae(settings, args.work)
    data = build_dataset(settings, args.work, vae, tokenizer)
    scaling = float(1.0 / data["latents"].std())
    unet, text_encoder = train_denoiser(settings, work, data, scaling, tokenizer)
    export(args.out, vae, unet, text_encoder, tokenizer, scaling)
    minutes = (time.time() - began) / 60
    (work / "done.json").write_text(json.dumps({"minutes_this_run": minutes, "out": str(args.out)}))
    print(f"wrote {args.out} ({minutes:.1f} min in this run; checkpoints in {work})")


if __name__ == "__main__":
    main()
