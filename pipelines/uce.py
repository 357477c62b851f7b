"""UCE (Gandikota et al. 2024): erase a concept by editing every cross-attention key and value
projection in closed form, with no training.

The text encoder is causal, so a concept lives not only in its own tokens' outputs but in every
output after them (end-of-text and padding). Each context prompt that names the concept is paired
with the same prompt naming the guide instead ("a red circle" -> "a red square"; the empty guide
drops the word). The edit sends the context's outputs from the concept onwards to where the
projection sends the guide prompt's outputs at the same places, and keeps every output of the
preserved prompts where it was (`pipelines.closed_form.ridge_edit`): the 2023 code's "replace"
over the slice from the concept through the padding.

On MM-DiT (SD3, Flux) the text's keys and values come from each double-stream block's own text-stream projections,
whose input is the text stream as it enters that block: it changes with the timestep, and with the image through the
blocks before. So each projection is solved on its own inputs, read at several noise levels from one fixed noise
latent, every level weighing 1 / levels (on a UNet or PixArt the input is the same for every layer and level).
There the concept also reaches every block through the pooled text embedding in the adaLN conditioning, so the
layer that first reads it (`pooled_projection`) is solved the same way: each context's pooled embedding sent where
the guide prompt's goes, the preserved prompts' kept.
"""

from __future__ import annotations

import re

import torch
from diffusers import DiffusionPipeline

from pipelines.closed_form import ridge_edit
from pipelines.generate import image_size
from xattn.conditioning import denoiser_output, encode_text, text_context
from xattn.denoiser import denoiser
from xattn.families import has_joint_attention, latent_channels, pooled_projection, text_projections
from xattn.tokens import WORD, pipeline_word_tokens


def replace_word(prompt: str, word: str, by: str) -> str:
    """`prompt` with every whole-word occurrence of `word` (a word or phrase, any case) replaced by `by`."""
    pattern = r"(?<![^\W_])" + r"\s+".join(re.escape(w) for w in WORD.findall(word)) + r"(?![^\W_])"
    return " ".join(re.sub(pattern, by, prompt, flags=re.IGNORECASE).split())


# The noise levels (scheduler timesteps) at which the inputs of MM-DiT's text projections are read.
JOINT_TIMESTEPS = (900.0, 700.0, 500.0, 300.0, 100.0)


def projection_inputs(pipe: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
    """{projection: (levels, prompts, tokens, width)}: what each of `text_projections` reads for these prompts. On a
    UNet or PixArt the text context, one level shared by every projection; on MM-DiT the text stream entering each
    double-stream block at JOINT_TIMESTEPS, from one fixed noise latent (seed 0)."""
    size = image_size(pipe)
    text, _ = encode_text(pipe, prompts, size)
    names = text_projections(pipe)
    if not has_joint_attention(pipe):
        with torch.no_grad():
            context = text_context(pipe, text.embeds).double()[None]
        return dict.fromkeys(names, context)
    model = denoiser(pipe)
    latent = (latent_channels(pipe), size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor)
    noise = torch.randn(latent, generator=torch.Generator().manual_seed(0)).to(model.device, model.dtype)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    hooks = [model.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: seen[name].append(args[0].detach()))
             for name in names]
    try:
        with torch.no_grad():
            for timestep in JOINT_TIMESTEPS:
                denoiser_output(pipe, noise.expand(len(prompts), *latent), timestep, text)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.stack(inputs).double() for name, inputs in seen.items()}


def _rows(inputs: torch.Tensor, places: list[torch.Tensor]) -> torch.Tensor:
    """(rows, width): each prompt's inputs at its places, at every level, weighed 1 / levels in the solve."""
    levels = inputs.shape[0]
    return torch.cat([inputs[:, i, where] for i, where in enumerate(places)], dim=1).flatten(0, 1) / levels**0.5


def read_weight(layer: torch.nn.Module) -> torch.Tensor:
    """(out, in) the linear map a projection applies: its weight, or under a peft LoRA layer the base weight
    plus the active adapters' deltas (read off the layer itself, so any adapter kind and scale counts)."""
    if not hasattr(layer, "base_layer"):
        return layer.weight.detach()
    base = layer.base_layer
    eye = torch.eye(base.in_features, dtype=base.weight.dtype, device=base.weight.device)
    with torch.no_grad():
        return (layer(eye) - layer(torch.zeros_like(eye[:1]))).T


def erase_pairs(pipe: DiffusionPipeline, concept: str, guide: str, contexts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{projection: (inputs, guide inputs)}: each context's inputs from the concept's first token to the end, and the
    guide prompt's inputs at the same places (shifted by the difference in token counts when they differ)."""
    guided = [replace_word(c, concept, guide) for c in contexts]
    starts, shifts = [], []
    for context, other in zip(contexts, guided):
        tokens = pipeline_word_tokens(pipe, context, concept, occurrence=0)
        guide_count = len(pipeline_word_tokens(pipe, other, guide, occurrence=0)) if guide.strip() else 0
        starts.append(tokens[0])
        shifts.append(guide_count - len(tokens))
    source, target = projection_inputs(pipe, contexts), projection_inputs(pipe, guided)
    length = next(iter(source.values())).shape[2]
    places = [torch.arange(start, length) for start in starts]
    shifted = [(where + shift).clamp(start, length - 1) for where, start, shift in zip(places, starts, shifts)]
    return {name: (_rows(source[name], places), _rows(target[name], shifted)) for name in source}


def uce_edit(
    pipe: DiffusionPipeline,
    concept: str,
    contexts: list[str],
    preserve: list[str],
    *,
    guide: str = "",
    lam: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """New weights of every text key and value projection (`text_projections`, diffusers names) that erase `concept` from the
    `contexts` prompts towards `guide`, keeping the `preserve` prompts' keys and values.

    The edit is solved on the map each projection applies (`read_weight`). Under a peft LoRA layer
    the new weight is its base layer's, shifted so that base plus adapter give the solved map; the
    erasure then belongs to the model with that LoRA (its fingerprint counts the adapter).
    """
    if not contexts:
        raise ValueError("UCE needs at least one context prompt that names the concept, e.g. 'a photo of a circle'")
    pairs = erase_pairs(pipe, concept, guide, contexts)
    kept = projection_inputs(pipe, preserve) if preserve else {}
    edited = {}
    model = denoiser(pipe)
    for name, (inputs, guides) in pairs.items():
        module = model.get_submodule(name)
        applied = read_weight(module)
        preserved = _rows(kept[name], [torch.arange(kept[name].shape[2])] * kept[name].shape[1]) if preserve else None
        solved = ridge_edit(applied, inputs, guides @ applied.double().T, preserved, lam, erase_scale, preserve_scale)
        if hasattr(module, "base_layer"):
            base = module.base_layer.weight.detach()
            solved = (base.double() + solved.double() - applied.double()).to(base.dtype)
        edited[f"{name}.weight"] = solved
    if not edited:
        raise ValueError(f"{type(model).__name__} has no projections of text keys and values for UCE to edit")
    pooled = pooled_projection(pipe)
    if pooled is not None:
        size = image_size(pipe)
        guided = [replace_word(c, concept, guide) for c in contexts]
        with torch.no_grad():
            vectors = [encode_text(pipe, prompts, size)[0].pooled.double() if prompts else None for prompts in (contexts, guided, preserve)]
        applied = read_weight(model.get_submodule(pooled))
        edited[f"{pooled}.weight"] = ridge_edit(applied, vectors[0], vectors[1] @ applied.double().T, vectors[2], lam, erase_scale,
                                                preserve_scale)
    return edited
