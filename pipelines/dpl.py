"""Dynamic Prompt Learning (Wang et al., NeurIPS 2023): real-image inversion in which each object noun of the caption
gets its own token embedding at every denoising step, learnt so that its cross-attention stays on its own object.

When a real image holds several objects, editing one word leaks: that word's attention spills onto the other objects
and the background, so they change too. At each step (from noise to image), before the null-text step, DPL updates
the input embeddings of the nouns' tokens (warm-started from the previous step's, the text encoder frozen) with

    L = w_at L_at + w_dj L_dj + w_bg L_bg   on the cross-attention maps of one conditional UNet call

- L_at (attention balancing): Attend-and-Excite's loss on the nouns' smoothed token shares;
- L_dj (disjoint objects): the mean cosine similarity of the nouns' maps;
- L_bg (background leakage): the mean cosine similarity of each noun's map with the background mask;

stopping once each loss is under its threshold beta * exp(-i / alpha) (i counted on the paper's 50-step schedule).
The background is where no noun is: from the user's masks, or from k-means on the inversion pass's self-attention,
each cluster named by the noun whose cross-attention fills it (`xattn.clustering`).

Deviations from the authors' code, each measured in RESULTS.md: the learning rate (see DPLSettings); the null-text
step is ours (warm-started, early stop) or, with "dpl-direct", our direct correction instead; every occurrence of a
noun is its own object, as the authors' placeholder tokens are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from pipelines.ddim import Level
from xattn import losses
from xattn.attach import attach
from xattn.capture import MapCapture
from xattn.clustering import BACKGROUND, regions
from xattn.conditioning import TextConditioning, denoiser_output, is_sdxl
from xattn.denoiser import frozen
from xattn.families import cross_resolutions, layout_side
from xattn.store import AttentionStore
from xattn.tokens import pipeline_tokenizer, prompt_words

log = logging.getLogger(__name__)
PAPER_STEPS = 50  # the thresholds' step counts are the paper's, on 50 DDIM steps


@dataclass(frozen=True)
class DPLSettings:
    """The paper's weights, thresholds (beta * exp(-i / alpha)) and updates per step (supplementary D; the authors'
    DPL.sh). learning_rate is 1e-4, not the paper's 1e-3: on the embedded model the attention-balancing loss never
    gets under its threshold, every step makes all its updates, and at 1e-3 the nouns' 64-wide vectors drift to twice
    their own norm, so edits that read them lose exactness and leak more than null-text (RESULTS.md, issue 28);
    `DPLSettings(learning_rate=1e-3)` is the paper's. inner_steps: at most this many updates per step. resolution:
    the maps' side (default: the UNet's layout level, the paper's 16x16 on SD 1.x at 512 px). clusters, label_threshold: the background masks' k-means and naming."""

    attention_weight: float = 1.0
    attention_alpha: float = 25.0
    attention_beta: float = 0.3
    disjoint_weight: float = 0.05
    disjoint_alpha: float = 25.0
    disjoint_beta: float = 0.9
    background_weight: float = 0.05
    background_alpha: float = 50.0
    background_beta: float = 0.7
    inner_steps: int = 21
    learning_rate: float = 1e-4
    resolution: int | None = None
    clusters: int = 5
    label_threshold: float = 0.2

    def thresholds(self, step: int, steps: int) -> tuple[float, float, float]:
        """(tau_at, tau_dj, tau_bg) at denoising step `step` of `steps`."""
        i = step * PAPER_STEPS / steps
        return (losses.dpl_threshold(i, self.attention_alpha, self.attention_beta),
                losses.dpl_threshold(i, self.disjoint_alpha, self.disjoint_beta),
                losses.dpl_threshold(i, self.background_alpha, self.background_beta))


@dataclass(frozen=True)
class Nouns:
    """The caption's object nouns: each occurrence's noun and tokens (one object each)."""

    nouns: tuple[str, ...]
    tokens: tuple[tuple[int, ...], ...]

    @property
    def words(self) -> tuple[str, ...]:
        """Each object's name: its noun, numbered (circle#1, circle#2) where the noun occurs more than once."""
        count = {n: self.nouns.count(n) for n in self.nouns}
        seen: dict[str, int] = {}
        names = []
        for noun in self.nouns:
            seen[noun] = seen.get(noun, 0) + 1
            names.append(noun if count[noun] == 1 else f"{noun}#{seen[noun]}")
        return tuple(names)

    @property
    def positions(self) -> list[int]:
        """All the objects' tokens, in order."""
        return [t for group in self.tokens for t in group]


def find_nouns(pipe: DiffusionPipeline, caption: str, nouns: Sequence[str]) -> Nouns:
    """Every occurrence in the caption of each named noun; a noun missing from the caption is an error naming its words."""
    if not nouns:
        raise ValueError("dpl learns the caption's object nouns: name them, e.g. nouns=['circle', 'square'] (--nouns circle,square)")
    words = [w for w in prompt_words(pipeline_tokenizer(pipe), caption) if w.tokens]
    found_nouns, found_tokens = [], []
    for noun in dict.fromkeys(n.strip() for n in nouns):
        hits = [w for w in words if w.text.casefold() == noun.casefold()]
        if not hits:
            raise ValueError(f"{noun!r} is not a word of the caption {caption!r}; its words are {', '.join(w.text for w in words)}: "
                             "name the nouns of the caption's objects")
        found_nouns += [noun] * len(hits)
        found_tokens += [word.tokens for word in hits]
    return Nouns(tuple(found_nouns), tuple(found_tokens))


def map_side(pipe: DiffusionPipeline, latent: tuple[int, int], settings: DPLSettings) -> int:
    side = settings.resolution or layout_side(pipe.unet, latent)
    if side not in cross_resolutions(pipe.unet, latent):
        raise ValueError(f"no cross-attention layer works at {side}x{side}; choose one of {cross_resolutions(pipe.unet, latent)}")
    return side


@contextmanager
def token_vectors(pipe: DiffusionPipeline, positions: Sequence[int], vectors: torch.Tensor) -> Iterator[None]:
    """While open, the text encoder's input embeddings at `positions` of what it encodes are `vectors` (positions, D)."""
    table = pipe.text_encoder.get_input_embeddings()

    def replace(module, inputs, output):
        output = output.clone()
        output[:, list(positions)] = vectors.to(output)
        return output

    handle = table.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def encode_with(pipe: DiffusionPipeline, prompt: str, positions: Sequence[int], vectors: torch.Tensor | None) -> torch.Tensor:
    """(1, T, D) embeddings of `prompt`, with `vectors` at `positions` of the encoder's input (none: as it is)."""
    device = pipe.unet.device
    if vectors is None or not positions:
        return pipe.encode_prompt([prompt], device, 1, False)[0]
    with token_vectors(pipe, positions, vectors):
        return pipe.encode_prompt([prompt], device, 1, False)[0]


def initial_vectors(pipe: DiffusionPipeline, caption: str, positions: Sequence[int]) -> torch.Tensor:
    """The nouns' own input embeddings: where learning starts (the authors initialise their placeholders from them)."""
    ids = pipeline_tokenizer(pipe)(caption).input_ids
    table = pipe.text_encoder.get_input_embeddings().weight
    return table[[ids[p] for p in positions]].detach().float().clone()


def check_supported(pipe: DiffusionPipeline) -> None:
    if is_sdxl(pipe):
        raise ValueError("dpl inversion runs on one text encoder (SD 1.x/2.x and the embedded model); SDXL's second encoder is "
                         "not learnt yet: use --inversion null-text or direct on SDXL")


def user_background(masks: Mapping[str, np.ndarray | torch.Tensor], nouns: Sequence[str], size: tuple[int, int], side: int) -> torch.Tensor:
    """The background (side, side) as floats: where none of the user's per-noun masks (at the model's image size) is."""
    named = set(nouns)
    if set(masks) != named:
        raise ValueError(f"give one mask per noun: masks for {sorted(masks)} but the nouns are {sorted(named)}")
    union = torch.zeros(size, dtype=torch.bool)
    for noun, mask in masks.items():
        mask = torch.as_tensor(np.asarray(mask))
        if tuple(mask.shape) != tuple(size):
            raise ValueError(f"the mask of {noun!r} is {tuple(mask.shape)}; masks are (height, width) of the image as the model "
                             f"sees it, {size}")
        union |= mask.bool()
    return _resized(~union, side)


def _resized(mask: torch.Tensor, side: int) -> torch.Tensor:
    return (F.interpolate(mask[None, None].float(), size=(side, side), mode="area")[0, 0] > 0.5).float()


def clustered_background(store: AttentionStore, nouns: Nouns, side: int, settings: DPLSettings) -> torch.Tensor:
    """The background (side, side) from the inversion pass's self-attention at the level above the maps' (the paper's
    32x32 on SD 1.x) and the nouns' cross-attention; a noun word no cluster is named after is warned about. Occurrences of
    one word share its name here (their maps are what leaks into each other before learning), as the authors' nouns do."""
    self_sides = sorted({max(k.resolution) for k in store.sums if k.kind == "self"})
    self_side = min([s for s in self_sides if s > side] or self_sides)
    total = sum(s / c for _, s, c in store.select("self", resolutions=[self_side]))
    cross = sum(s / c for _, s, c in store.select("cross", resolutions=[side]))[0]
    words = list(dict.fromkeys(nouns.nouns))
    tokens = {w: [t for noun, group in zip(nouns.nouns, nouns.tokens) if noun == w for t in group] for w in words}
    maps = torch.stack([cross[:, tokens[w]].mean(-1) for w in words]).reshape(len(words), side, side)
    found = regions(total[0], maps, words, settings.clusters, settings.label_threshold)
    missing = [w for w in words if w not in found]
    if missing:
        log.warning("the self-attention clustering found no region for %s: the background may hold it. Give a mask per noun "
                    "(masks=..., --masks) to tell them apart", ", ".join(map(repr, missing)))
    background = found.get(BACKGROUND, torch.zeros(self_side, self_side, dtype=torch.bool))
    return _resized(background, side)


def inversion_store(pipe: DiffusionPipeline, latent: tuple[int, int], side: int) -> AttentionStore:
    """A store for the inversion pass: cross-attention at the maps' side, self-attention at that side and the next."""
    return AttentionStore(self_attention=True, resolutions=[s for s in cross_resolutions(pipe.unet, latent) if s >= side][:2])


def terms(maps: torch.Tensor, nouns: Nouns, background: torch.Tensor) -> torch.Tensor:
    """(L_at, L_dj, L_bg) of one row's (1, h, w, keys) cross-attention, as a (3,) tensor."""
    concepts = [[list(tokens) for tokens in nouns.tokens]]
    shares = losses.smooth(losses.token_shares(maps, concepts, [(1, -1)]), losses.gaussian_kernel())
    raw = losses.token_attention(maps, concepts)
    return torch.cat([losses.attend_excite_loss(shares), losses.disjoint_loss(raw), losses.background_loss(raw, background)])


def learn_step(
    pipe: DiffusionPipeline,
    capture: MapCapture,
    x: torch.Tensor,
    level: Level,
    caption: str,
    nouns: Nouns,
    vectors: torch.Tensor,
    background: torch.Tensor,
    settings: DPLSettings,
    thresholds: tuple[float, float, float],
) -> tuple[torch.Tensor, int]:
    """The nouns' vectors after at most `inner_steps` AdamW updates at this step, and how many were made: the losses are
    checked before each update, so a step that already meets every threshold makes none (the authors' order)."""
    vectors = vectors.detach().clone().requires_grad_(True)
    optimiser = torch.optim.AdamW([vectors], lr=settings.learning_rate)
    weights = torch.tensor([settings.attention_weight, settings.disjoint_weight, settings.background_weight])
    bounds = torch.tensor(thresholds)
    updates = 0
    while updates < settings.inner_steps:
        embeds = encode_with(pipe, caption, nouns.positions, vectors)
        maps = capture.run(lambda: denoiser_output(pipe, x, level.timestep, TextConditioning(embeds)))
        values = terms(maps.float(), nouns, background.to(maps.device))
        if bool((values.detach().cpu() < bounds).all()):
            break
        loss = (values * weights.to(values)).sum()
        if not torch.isfinite(loss):
            raise ValueError(f"dpl's loss became {loss.item()} at timestep {int(level.timestep)}; lower its learning rate")
        (vectors.grad,) = torch.autograd.grad(loss, [vectors])
        optimiser.step()
        updates += 1
    return vectors.detach(), updates


@contextmanager
def map_capture(pipe: DiffusionPipeline, capture: MapCapture) -> Iterator[MapCapture]:
    """`capture` attached for the block, the UNet's weights frozen. Keep one capture for a whole inversion: once it has
    seen a UNet call it knows the last layer at its side and ends the learning passes there."""
    with attach(pipe, capture), frozen(pipe.unet):
        yield capture
