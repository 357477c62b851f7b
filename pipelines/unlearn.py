"""One trainer for concept unlearning: ESD, Forget-Me-Not and SalUn fine-tune a copy of the UNet;
UCE edits it in closed form (`pipelines.uce`). The result is the changed tensors, saved by
`pipelines.erasure` and applied with `load_erasure`.

    result = unlearn(pipe, UnlearnSettings(method="salun", concept="circle", guide="square"), out="runs/erase")

Objectives (x_t: a noisy latent at timestep t; c: a prompt naming the concept; c': the same prompt
with the concept replaced by the guide, the empty prompt when there is none):
- ESD (Gandikota et al. 2023): eps_trained(x_t, c) -> e' - eta (e_c - e'), e_c and e' the frozen
  reference's predictions for c and c', x_t sampled by the reference from noise under c. With no
  guide e' is the empty prompt's, the paper's setting; eta = 1 is the paper's scale (the 2024
  code's eta = 2 with e_c in front is the same target).
- Forget-Me-Not (Zhang et al. 2023): the L2 norm of every cross-attention probability at the
  concept's tokens (`xattn.resteer`), on noised images of the concept.
- SalUn (Fan et al. 2024): eps(x_t, c) -> stop_grad eps(x_t, c') on images of the concept, plus
  retain_weight x the usual denoising loss on images of the preserved prompts; only the salient
  weights move (the top `saliency` share by |gradient of the forgetting loss|, `pipelines.saliency`).

Images for FMN and SalUn are the user's or the base model's own, generated from the prompts. The
training is the same whatever sampler the pipeline carries: x_t for ESD and the model's own images
come from the model's own deterministic sampler, and FMN and SalUn noise their images with the
model's forward process (`pipelines.training_process`: DDPM and DDIM from a diffusion's config; the
straight line and Euler on a rectified flow, where the predictions above are velocities). On MM-DiT
(SD3, Flux), "cross-attention" is the image queries' attention to the text keys in joint attention:
FMN re-steers that block, and the esd-x groups train the joint attention (`parameter_group`). The copy
that trains is float32 (a float16 or bfloat16 pipeline's weights come back in its dtype), reads
separate projections where the pipeline's are fused, and under peft LoRA trains the base weights
with the adapters active. A non-finite loss or weight stops training with an error. Training
runs under accelerate (device, mixed precision, several GPUs), writes an atomic checkpoint every
`checkpoint_every` steps and resumes from it after a kill.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from pipelines.erasure import save_erasure
from pipelines.files import slug
from pipelines.generate import image_size
from pipelines.limits import MAX_SEED
from pipelines.images import image_to_latent, prepare_image, read_image
from pipelines.inversion_cache import arrays_digest, model_fingerprint
from pipelines.loading import EMBEDDED, EMBEDDED_MODELS
from pipelines.saliency import masked_step, saliency_masks
from pipelines.training_process import DiffusionProcess, FlowProcess, training_process
from pipelines.uce import replace_word, uce_edit
from shapes import erasure_prompts
from xattn.attach import attach
from xattn.conditioning import TextConditioning, denoiser_output, encode_text
from xattn.denoiser import base_parameters, denoiser, has_ip_adapter
from xattn.families import family_of, latent_channels, text_projections
from xattn.resteer import ConceptAttention
from xattn.tokens import WORD, pipeline_tokenizers, pipeline_word_tokens

METHODS = ("esd-x", "esd-x-strict", "esd-u", "fmn", "salun", "salun-kv", "uce")
GROUPS = ("esd-x", "esd-x-strict", "esd-u", "full")
TEMPLATES = ("{}", "a {}", "a photo of a {}", "an image of a {}", "a picture of a {}")
EVERYDAY = ("person", "man", "woman", "dog", "cat", "car", "house", "tree", "flower", "bird", "chair", "table")
MAX_STEPS = 100_000
ImageSource = str | Path | Image.Image

# Per method: the parameter group, steps, learning rate (tuned on the embedded model; the papers'
# SD settings are in the comments of UnlearnSettings).
_DEFAULTS = {
    "esd-x": ("esd-x", 100, 5e-4),
    "esd-x-strict": ("esd-x-strict", 100, 5e-4),
    "esd-u": ("esd-u", 100, 1e-4),
    "fmn": ("esd-x", 35, 1e-3),
    "salun": ("full", 100, 1e-4),
    "uce": ("esd-x-strict", 0, 0.0),
}
# Methods that are another's settings: SalUn on cross-attention keys and values with a stronger retain loss, which
# erases a colour into another where whole-UNet SalUn blanks the canvas (RESULTS.md, issue 7).
VARIANTS = {"salun-kv": ("salun", {"group": "esd-x-strict", "lr": 3e-3, "retain_weight": 1.0})}


def parameter_group(unet: torch.nn.Module, group: str) -> dict[str, torch.nn.Parameter]:
    """The denoiser parameters a method trains, by diffusers names: the model's own (`xattn.denoiser.base_parameters`:
    a LoRA layer's base weight, never an adapter's or a fused copy).

    esd-x: every projection of the attention layers where image queries read text keys (a UNet's or PixArt's attn2 q,
    k, v, out; on MM-DiT every joint attention layer's, both streams); esd-x-strict: the text keys and values only
    (`xattn.families.text_projections`: attn2's to_k and to_v, MM-DiT's add_k_proj and add_v_proj); esd-u: the weights
    of every linear and convolution layer outside those attention layers; full: every parameter.
    """
    if group not in GROUPS:
        raise ValueError(f"unknown parameter group {group!r}; choose one of {', '.join(GROUPS)}")
    own = base_parameters(unet)
    if group == "full":
        return own
    root, chosen = denoiser(unet), {}
    family = family_of(root)
    attention = [key.removesuffix(".processor") for key in root.attn_processors if family.layer(key).kind in ("cross", "joint")]
    if not attention:
        raise ValueError(f"{type(root).__name__} has no attention layer that reads the text, so the {group} group selects nothing; "
                         "choose full")
    keys_and_values = set(text_projections(root))
    for name, param in own.items():
        layer = name.rpartition(".")[0]  # "" for a parameter of the model itself (PixArt's scale_shift_table)
        module = root.get_submodule(layer)
        module = getattr(module, "base_layer", module)
        cross = any(f"{layer}.".startswith(f"{a}.") for a in attention)
        if group == "esd-x-strict":
            keep = layer in keys_and_values
        elif group == "esd-x":
            keep = cross and isinstance(module, torch.nn.Linear)
        else:
            keep = not cross and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
        if keep:
            chosen[name] = param
    return chosen


def template_prompts(words) -> tuple[str, ...]:
    """UCE's prompt templates around each word: "circle" -> "circle", "a circle", "a photo of a circle", ..."""
    return tuple(template.format(word) for word in words for template in TEMPLATES)


@dataclass(frozen=True)
class UnlearnSettings:
    """What to erase and how. Empty group/steps/lr take the method's defaults (`_DEFAULTS`).

    guide: what the concept turns into (UCE's guide, ESD's anchor, SalUn's replacement); "" is the
    empty prompt for ESD, dropping the word for UCE. contexts: prompts that name the concept
    (default: UCE's templates around it). preserve: prompts to keep (UCE's preserved inputs,
    SalUn's retain set). batch: images per step for FMN and SalUn (ESD draws one latent per step,
    as the paper). sample_steps, start_guidance: how ESD's x_t and the model's own training images
    are sampled (DDIM). saliency: SalUn's share of weights that may move; mask_guidance: the CFG
    scale of its mask's loss. lam, preserve_scale: UCE's ridge weights. precision: accelerate's
    mixed precision ("no", "bf16", "fp16").
    The papers on SD: ESD 1000 steps at lr 1e-5 (eta 1, x_t at guidance 3 over 50 DDIM steps); FMN
    35 steps at 2e-6 over the whole UNet; SalUn 5 epochs at 1e-5, retain weight 0.5, a 50 % mask.
    The embedded model is ~150x smaller than SD 1.x and wants larger steps.
    """

    method: str
    concept: str
    guide: str = ""
    contexts: tuple[str, ...] = ()
    preserve: tuple[str, ...] = ()
    group: str = ""
    steps: int = 0
    lr: float = 0.0
    batch: int = 4
    eta: float = 1.0
    start_guidance: float = 3.0
    sample_steps: int = 10
    images_per_prompt: int = 4
    saliency: float = 0.5
    mask_guidance: float = 7.5
    retain_weight: float = 0.5
    lam: float = 0.5
    preserve_scale: float = 1.0
    precision: str = "no"
    checkpoint_every: int = 50
    seed: int = 0

    def resolved(self) -> UnlearnSettings:
        """These settings with the method's defaults filled in and the contexts spelled out."""
        if self.method not in METHODS:
            raise ValueError(f"unknown unlearning method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0 <= self.steps <= MAX_STEPS:
            raise ValueError(f"--steps must be between 0 (the method's default) and {MAX_STEPS}; got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"--lr must be a finite number, 0 (the method's default) or more; got {self.lr}")
        if not 0 <= self.seed <= MAX_SEED // 2:
            raise ValueError(f"--seed must be between 0 and {MAX_SEED // 2}; got {self.seed}")
        method, preset = VARIANTS.get(self.method, (self.method, {}))
        defaults = {f.name: f.default for f in fields(self)}
        own = replace(self, method=method, **{k: v for k, v in preset.items() if getattr(self, k) == defaults[k]})
        group, steps, lr = _DEFAULTS[method]
        return replace(own, group=own.group or group, steps=own.steps or steps, lr=own.lr or lr,
                       contexts=own.contexts or template_prompts([own.concept]))


def with_defaults(settings: UnlearnSettings, model: str) -> UnlearnSettings:
    """The settings with what a user left out filled in so that the concept goes and the rest stays.

    On the embedded models (`model` is the label of either), contexts and preserved prompts default to the world's
    captions that name the concept and those that do not (`shapes.erasure_prompts`): templates such as "a photo of a circle" miss
    the "a red circle" users type, and UCE or SalUn with nothing preserved wipes every prompt. Elsewhere the preserved
    prompts default to UCE's templates around everyday concepts (`EVERYDAY`). Only UCE and SalUn take preserved prompts.
    ESD without a guide steers toward the empty prompt's prediction, which does not erase on the embedded UNet model
    (RESULTS.md): there it asks for a guide.
    """
    contexts, preserve = erasure_prompts(settings.concept) if model in EMBEDDED_MODELS else ((), template_prompts(EVERYDAY))
    if model == EMBEDDED and settings.method.startswith("esd") and not settings.guide:
        raise ValueError(f"on the embedded model ESD needs --guide, what {settings.concept!r} turns into (e.g. --guide square): "
                         "steering it toward the empty prompt leaves it drawn")
    keeps = VARIANTS.get(settings.method, (settings.method,))[0] in ("uce", "salun")
    concept = set(settings.concept.split())
    preserve = tuple(p for p in preserve if not concept & set(p.split()))
    return replace(settings, contexts=settings.contexts or contexts, preserve=settings.preserve or (preserve if keeps else ()))


def erasure_name(settings: UnlearnSettings) -> str:
    """erase-<concept>-<method>: the erasure file's name and its training checkpoint's, so erasures can share a folder."""
    return f"erase-{slug(settings.concept)}-{settings.method}"


@dataclass
class Unlearned:
    """The changed UNet tensors (diffusers names) and a record of the run (settings, seconds, losses)."""

    tensors: dict[str, torch.Tensor]
    record: dict = field(default_factory=dict)


def check_concept(pipe: DiffusionPipeline, concept: str) -> None:
    """Refuse a concept whose words the tokenizer(s) do not hold as whole words: there is no token to erase."""
    words = WORD.findall(concept)
    if not words:
        raise ValueError("name the concept to erase in words, e.g. --concept circle")
    for tokenizer in pipeline_tokenizers(pipe):
        for word in words:
            pieces = tokenizer.tokenize(word)  # CLIP's "circle</w>", T5's "▁circle": one piece when the word is one token
            if len(pieces) != 1:
                raise ValueError(
                    f"{word!r} is not a word of the tokenizer's vocabulary (it splits into {' + '.join(pieces)}), so the model has "
                    f"no token of it to erase; name the concept in words the tokenizer knows"
                )


def _check_prompts(pipe: DiffusionPipeline, settings: UnlearnSettings) -> None:
    for prompt in settings.contexts:
        pipeline_word_tokens(pipe, prompt, settings.concept, occurrence=0)
    if settings.guide.strip():
        check_concept(pipe, settings.guide)


def _guided(settings: UnlearnSettings, prompts: list[str]) -> list[str]:
    """c' for each prompt: the concept replaced by the guide, or the empty prompt when there is no guide."""
    return [replace_word(p, settings.concept, settings.guide) if settings.guide.strip() else "" for p in prompts]


def _latent_shape(pipe: DiffusionPipeline) -> tuple[int, int, int]:
    """(channels, h, w) of the pipeline's spatial latents at its default size."""
    size = image_size(pipe)
    return latent_channels(pipe), size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor


def _own_images(pipe: DiffusionPipeline, process: DiffusionProcess | FlowProcess, prompts: list[str], per_prompt: int,
                settings: UnlearnSettings, seed: int) -> torch.Tensor:
    """Latents of the base model's own images of `prompts` (per_prompt each, image i from the noise of seed + i), drawn
    with the model's own guided deterministic sampler whatever sampler the pipeline carries."""
    repeated = [p for p in prompts for _ in range(per_prompt)]
    model = denoiser(pipe)
    latent = _latent_shape(pipe)
    noise = torch.cat([randn_tensor((1, *latent), generator=torch.Generator(device="cpu").manual_seed(seed + i), dtype=model.dtype)
                       for i in range(len(repeated))]).to(model.device)
    with torch.no_grad():
        cond, uncond = encode_text(pipe, repeated, image_size(pipe))
    batches = [process.sample(pipe, noise[i : i + 8], cond.take(list(range(i, min(i + 8, len(repeated))))),
                              uncond.take(list(range(i, min(i + 8, len(repeated))))), settings.start_guidance)
               for i in range(0, len(repeated), 8)]
    return torch.cat(batches)


def _user_latents(pipe: DiffusionPipeline, images: list[ImageSource]) -> torch.Tensor:
    """The latents of the user's images of the concept, sized to the model as `edit --image` does."""
    size = image_size(pipe)
    return torch.cat([image_to_latent(pipe, prepare_image(image, size).image) for image in images])


def esd_target(e_anchor: torch.Tensor, e_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's negatively guided target, e_anchor - eta (e_concept - e_anchor)."""
    return e_anchor - eta * (e_concept - e_anchor)


def _unfused_copy(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The UNet to train: a float32 copy (Adam's state and small updates need it; fp16 steps give NaN), reading
    separate query/key/value projections even where the pipeline's are fused, so the trained weights are the ones
    the erasure names."""
    unet = copy.deepcopy(denoiser(pipe)).float().train(False)
    unet.requires_grad_(False)
    fused = {key: AttnProcessor2_0() for key, processor in unet.attn_processors.items() if isinstance(processor, FusedAttnProcessor2_0)}
    if fused:
        unet.set_attn_processor({**unet.attn_processors, **fused})
    return unet


class _Trainer:
    """State of one training run: the trained copy, its optimiser, data, masks, step and randomness."""

    def __init__(self, pipe: DiffusionPipeline, settings: UnlearnSettings, images: list[ImageSource] | None, saved: dict | None):
        self.pipe, self.settings = pipe, settings
        self.accelerator = Accelerator(mixed_precision=settings.precision, cpu=not torch.cuda.is_available())
        pipe.to(self.accelerator.device)
        self.size = image_size(pipe)
        self.generator = torch.Generator(device="cpu").manual_seed(settings.seed + self.accelerator.process_index)
        self.latent = _latent_shape(pipe)
        self.process = training_process(pipe, settings.sample_steps, self.latent[1:])
        self.unet = _unfused_copy(pipe)
        self.params = parameter_group(self.unet, settings.group)
        for p in self.params.values():
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=settings.lr, weight_decay=0.0)
        self.model, self.optimizer = self.accelerator.prepare(self.unet, self.optimizer)
        self.step, self.losses, self.masks = 0, [], None
        self.contexts = list(settings.contexts)
        with torch.no_grad():
            self.context_text, self.empty_text = encode_text(pipe, self.contexts, self.size)
            self.guide_text = encode_text(pipe, _guided(settings, self.contexts), self.size)[0]
            self.retain_text = encode_text(pipe, list(settings.preserve), self.size)[0] if settings.method == "salun" else None
        self.concept_columns = torch.zeros(len(self.contexts), self.context_text.embeds.shape[1], dtype=torch.bool)
        for row, prompt in enumerate(self.contexts):
            self.concept_columns[row, pipeline_word_tokens(pipe, prompt, settings.concept)] = True
        self.forget = self.forget_rows = self.retain = None
        if saved is not None:
            self._restore(saved)
            return
        if settings.method in ("fmn", "salun"):
            self.forget, self.forget_rows = self._forget_data(images)
        if settings.method == "salun":
            self.retain = _own_images(pipe, self.process, list(settings.preserve), settings.images_per_prompt, settings, settings.seed + 10_000)
            self.saliency()

    def _forget_data(self, images: list[ImageSource] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents of the concept and, per latent, the context prompt it goes with."""
        s = self.settings
        if images:
            latents = _user_latents(self.pipe, images)
            rows = torch.arange(len(latents)) % len(self.contexts)
        else:
            latents = _own_images(self.pipe, self.process, self.contexts, s.images_per_prompt, s, s.seed)
            rows = torch.arange(len(latents)) // s.images_per_prompt
        return latents, rows

    def _sample(self, count: int, total: int) -> torch.Tensor:
        return torch.randint(0, total, (count,), generator=self.generator)

    def _predict(self, latents: torch.Tensor, t: torch.Tensor, text: TextConditioning, trained: bool = True) -> torch.Tensor:
        """The trained copy's float32 prediction (the frozen pipeline's, in its dtype, with trained=False)."""
        device = self.accelerator.device
        if not trained:
            return denoiser_output(self.pipe, latents.to(device, denoiser(self.pipe).dtype), t.to(device), text)
        return denoiser_output(self.pipe, latents.to(device, torch.float32), t.to(device), text.to(torch.float32), unet=self.model)

    def _esd_loss(self) -> torch.Tensor:
        s, pipe = self.settings, self.pipe
        row = self._sample(1, len(self.contexts)).tolist()
        stop = int(torch.randint(0, s.sample_steps, (1,), generator=self.generator))
        start = randn_tensor((1, *self.latent), generator=self.generator, dtype=denoiser(pipe).dtype)
        with torch.no_grad():
            x = self.process.sample(pipe, start.to(denoiser(pipe).device), self.context_text.take(row), self.empty_text.take(row),
                                    s.start_guidance, stop)
            t = torch.tensor([self.process.timestep(stop)])
            e_anchor = self._predict(x, t, self.guide_text.take(row), trained=False)
            e_concept = self._predict(x, t, self.context_text.take(row), trained=False)
            target = esd_target(e_anchor.float(), e_concept.float(), s.eta)
        return F.mse_loss(self._predict(x, t, self.context_text.take(row)).float(), target)

    def _forget_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, context rows) for a batch of the concept's images."""
        picks = self._sample(self.settings.batch, len(self.forget))
        x, t, _ = self.process.noised(self.forget[picks].float(), self.generator)
        return x, t, self.forget_rows[picks]

    def _fmn_loss(self) -> torch.Tensor:
        x, t, rows = self._forget_batch()
        capture = ConceptAttention(self.concept_columns[rows].to(self.accelerator.device))
        with attach(self.accelerator.unwrap_model(self.model), capture):
            self._predict(x, t, self.context_text.take(rows.tolist()))
        return capture.take()

    def _salun_loss(self) -> torch.Tensor:
        s = self.settings
        x, t, rows = self._forget_batch()
        with torch.no_grad():
            target = self._predict(x, t, self.guide_text.take(rows.tolist()))
        forget = F.mse_loss(self._predict(x, t, self.context_text.take(rows.tolist())).float(), target.float())
        picks = self._sample(s.batch, len(self.retain))
        latents = self.retain[picks].float()
        xr, tr, wanted = self.process.noised(latents, self.generator)
        prompt_rows = (picks // s.images_per_prompt).tolist()
        wanted = wanted.to(self.accelerator.device)
        retain = F.mse_loss(self._predict(xr, tr, self.retain_text.take(prompt_rows)).float(), wanted.float())
        return forget + s.retain_weight * retain

    def saliency(self) -> None:
        """SalUn's mask: one pass over the concept's images with gradient ascent on the guided prediction's
        denoising loss; the top `saliency` share of weights by |summed gradient| may move."""
        s = self.settings
        sums = {name: torch.zeros_like(p) for name, p in self.params.items()}
        for begin in range(0, len(self.forget), s.batch):
            picks = torch.arange(begin, min(begin + s.batch, len(self.forget)))
            clean = self.forget[picks].float()
            x, t, wanted = self.process.noised(clean, self.generator)
            rows = self.forget_rows[picks].tolist()
            cond = self._predict(x, t, self.context_text.take(rows))
            uncond = self._predict(x, t, self.empty_text.rows(len(rows)))
            guided = (1 + s.mask_guidance) * cond - s.mask_guidance * uncond
            wanted = wanted.to(guided.device)
            self.accelerator.backward(-F.mse_loss(guided.float(), wanted.float()))
            for name, p in self.params.items():
                sums[name] += p.grad
                p.grad = None
        self.masks = saliency_masks(sums, s.saliency)

    def loss(self) -> torch.Tensor:
        method = self.settings.method
        if method == "fmn":
            return self._fmn_loss()
        if method == "salun":
            return self._salun_loss()
        return self._esd_loss()

    def train_step(self) -> float:
        with self.accelerator.autocast():
            loss = self.loss()
        if not torch.isfinite(loss):
            raise ValueError(
                f"{self.settings.method} step {self.step + 1}: the loss is {loss.item()}; nothing was saved from this step. "
                f"Lower the learning rate (now {self.settings.lr:g}) or train in float32 (precision='no')"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if self.masks is None:
            self.optimizer.step()
        else:
            masked_step(self.optimizer, self.params, self.masks)
        self.step += 1
        self.losses.append(loss.item())
        return self.losses[-1]

    def state(self) -> dict:
        return {
            "settings": asdict(self.settings), "step": self.step, "losses": self.losses,
            "params": {n: p.detach().cpu() for n, p in self.params.items()}, "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(), "masks": self.masks, "forget": self.forget,
            "forget_rows": self.forget_rows, "retain": self.retain,
        }

    def _restore(self, state: dict) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["params"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step, self.losses, self.masks = state["step"], state["losses"], state["masks"]
        self.forget, self.forget_rows, self.retain = state["forget"], state["forget_rows"], state["retain"]


def _load_checkpoint(path: Path) -> dict:
    """The checkpoint's tensors, numbers and strings, unpickled with torch's allow-list (`weights_only=True`):
    an output folder may be shared, and a checkpoint that names any other Python object could run code."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        why = "it names Python objects, which could run code; it was not loaded"
    except (EOFError, RuntimeError):
        why = "it is damaged or cut short"
    raise ValueError(f"{path} is not a checkpoint xattn can read safely: {why}. Delete it to start over, or write to another --out")


def _origin(pipe: DiffusionPipeline, images: list[ImageSource] | None) -> dict[str, str]:
    """What a run starts from besides its settings: the base weights and the user's images (their pixels)."""
    pixels = {f"{i:06d}": np.asarray(read_image(image).convert("RGB")) for i, image in enumerate(images or [])}
    return {"base": model_fingerprint(pipe), "images": arrays_digest(pixels) if images else "the model's own"}


def _check_resumable(state: dict, settings: UnlearnSettings, origin: dict[str, str], path: Path) -> None:
    """A checkpoint continues only the run it came from (settings, base weights, images); `steps` alone may grow,
    never shrink below the step reached."""
    if state.get("base") != origin["base"]:
        raise ValueError(f"{path} was trained from other base weights than this model's; load the model it came from, "
                         "or write to another --out")
    if state.get("images") != origin["images"]:
        raise ValueError(f"{path} was trained on other images of the concept ({state.get('images', 'unknown')[:12]} there, "
                         f"{origin['images'][:12]} now); give the same --images, or write to another --out")
    saved = state["settings"]
    differ = [f.name for f in fields(settings) if f.name != "steps" and saved.get(f.name) != getattr(settings, f.name)]
    if differ:
        listing = ", ".join(f"{n}: {saved.get(n)!r} there, {getattr(settings, n)!r} now" for n in differ)
        raise ValueError(f"{path} is a checkpoint of other settings ({listing}); resume with those settings, or write to another --out")
    if state["step"] > settings.steps:
        raise ValueError(f"{path} has trained {state['step']} steps, past the {settings.steps} asked; ask for --steps {state['step']} "
                         "or more to resume it, or write to another --out to train fewer")


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def unlearn(
    pipe: DiffusionPipeline,
    settings: UnlearnSettings,
    out: Path | str | None = None,
    images: list[ImageSource] | None = None,
    progress: bool = True,
) -> Unlearned:
    """Erase `settings.concept` from a copy of the pipeline's denoiser; `pipe` itself is left as it was.

    With `out`, training checkpoints to out/<erasure name>.checkpoint.pt and a rerun resumes from it. `images`:
    the user's pictures of the concept for FMN and SalUn (default: the base model's own).
    """
    checkpoint = checkpoint_path(out, settings) if out is not None else None
    settings = settings.resolved()
    check_concept(pipe, settings.concept)
    _check_prompts(pipe, settings)
    if settings.method == "salun" and not settings.preserve:
        raise ValueError("SalUn needs prompts to retain (its retain loss), e.g. --preserve square,triangle")
    if settings.preserve and settings.method not in ("salun", "uce"):
        raise ValueError(f"{settings.method} keeps no preserved prompts (only uce and salun do); leave out --preserve")
    if images and settings.method not in ("fmn", "salun"):
        raise ValueError(f"{settings.method} trains on prompts alone (only fmn and salun take images); leave out --images")
    if settings.method != "uce" and has_ip_adapter(pipe):
        raise ValueError(f"{settings.method} trains the UNet on text prompts alone, and this pipeline has an IP-Adapter loaded: "
                         "pipe.unload_ip_adapter() first; the erasure applies with or without the adapter loaded again")
    began = time.perf_counter()
    if settings.method == "uce":
        tensors = uce_edit(pipe, settings.concept, list(settings.contexts), list(settings.preserve), guide=settings.guide,
                           lam=settings.lam, preserve_scale=settings.preserve_scale)
        return Unlearned(tensors, {"settings": asdict(settings), "seconds": time.perf_counter() - began})
    saved, origin = None, _origin(pipe, images) if checkpoint is not None else {}
    if checkpoint is not None and checkpoint.exists():
        saved = _load_checkpoint(checkpoint)
        _check_resumable(saved, settings, origin, checkpoint)
    trainer = _Trainer(pipe, settings, images, saved)
    main = trainer.accelerator.is_main_process
    bar = tqdm(total=settings.steps, initial=trainer.step, desc=f"{settings.method} {settings.concept}", disable=not (progress and main))
    while trainer.step < settings.steps:
        bar.set_postfix(loss=f"{trainer.train_step():.4f}")
        bar.update()
        if checkpoint is not None and main and (trainer.step % settings.checkpoint_every == 0 or trainer.step == settings.steps):
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic(trainer.state() | origin, checkpoint)
    bar.close()
    tensors = changed_tensors(base_parameters(pipe), trainer.params)
    seconds = time.perf_counter() - began
    losses = np.asarray(trainer.losses)
    return Unlearned(tensors, {"settings": asdict(settings), "seconds": seconds, "first_loss": float(losses[:10].mean()),
                               "last_loss": float(losses[-10:].mean())})


def changed_tensors(base: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained tensors, in the model's dtype, that differ from the model's there; non-finite ones are refused."""
    changed = {}
    for name, value in trained.items():
        value = value.detach().to("cpu", base[name].dtype)
        if not torch.isfinite(value).all():
            raise ValueError(f"training left non-finite values in {name}; nothing was saved. Lower the learning rate")
        if not torch.equal(value, base[name].detach().cpu()):
            changed[name] = value
    return changed


def checkpoint_path(out: Path | str, settings: UnlearnSettings) -> Path:
    return Path(out) / f"{erasure_name(settings)}.checkpoint.pt"


def erase(
    pipe: DiffusionPipeline,
    settings: UnlearnSettings,
    out: Path | str,
    model: str,
    images: list[ImageSource] | None = None,
    progress: bool = True,
) -> Path:
    """Unlearn with the model's defaults (`with_defaults`), resuming from its checkpoint in `out` when there is one, and
    write out/erase-<concept>-<method>.safetensors; the checkpoint goes once the erasure file is safely written. `model`
    labels the base in the metadata."""
    settings = with_defaults(settings, model)
    result = unlearn(pipe, settings, out=out, images=images, progress=progress)
    path = Path(out) / f"{erasure_name(settings)}.safetensors"
    if not PartialState().is_main_process:
        return path
    save_erasure(path, result.tensors, method=settings.method, concept=settings.concept, base=model_fingerprint(pipe),
                 settings={**result.record, "model": model})
    checkpoint_path(out, settings).unlink(missing_ok=True)
    return path
