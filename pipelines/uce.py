"""UCE (Gandikota et al. 2024): erase a concept by editing every cross-attention key and value
projection in closed form, with no training.

The text encoder is causal, so a concept lives not only in its own tokens' outputs but in every
output after them (end-of-text and padding). Each context prompt that names the concept is paired
with the same prompt naming the guide instead ("a red circle" -> "a red square"; the empty guide
drops the word). The edit sends the context's outputs from the concept onwards to where the
projection sends the guide prompt's outputs at the same places, and keeps every output of the
preserved prompts where it was (`pipelines.closed_form.ridge_edit`): the 2023 code's "replace"
over the slice from the concept through the padding.
"""

from __future__ import annotations

import re

import torch
from diffusers import DiffusionPipeline

from pipelines.closed_form import ridge_edit
from pipelines.generate import image_size
from xattn.conditioning import encode_text, text_context
from xattn.denoiser import denoiser
from xattn.tokens import WORD, pipeline_word_tokens


def replace_word(prompt: str, word: str, by: str) -> str:
    """`prompt` with every whole-word occurrence of `word` (a word or phrase, any case) replaced by `by`."""
    pattern = r"(?<![^\W_])" + r"\s+".join(re.escape(w) for w in WORD.findall(word)) + r"(?![^\W_])"
    return " ".join(re.sub(pattern, by, prompt, flags=re.IGNORECASE).split())


def _outputs(pipe: DiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """The text the denoiser's cross-attention reads (`text_context`), (prompts, tokens, width)."""
    with torch.no_grad():
        return text_context(pipe, encode_text(pipe, prompts, image_size(pipe))[0].embeds).double()


def read_weight(layer: torch.nn.Module) -> torch.Tensor:
    """(out, in) the linear map a projection applies: its weight, or under a peft LoRA layer the base weight
    plus the active adapters' deltas (read off the layer itself, so any adapter kind and scale counts)."""
    if not hasattr(layer, "base_layer"):
        return layer.weight.detach()
    base = layer.base_layer
    eye = torch.eye(base.in_features, dtype=base.weight.dtype, device=base.weight.device)
    with torch.no_grad():
        return (layer(eye) - layer(torch.zeros_like(eye[:1]))).T


def erase_pairs(pipe: DiffusionPipeline, concept: str, guide: str, contexts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, guide inputs): each context's outputs from the concept's first token to the end, and the guide
    prompt's outputs at the same places (shifted by the difference in token counts when they differ)."""
    guided = [replace_word(c, concept, guide) for c in contexts]
    starts, shifts = [], []
    for context, other in zip(contexts, guided):
        tokens = pipeline_word_tokens(pipe, context, concept, occurrence=0)
        guide_count = len(pipeline_word_tokens(pipe, other, guide, occurrence=0)) if guide.strip() else 0
        starts.append(tokens[0])
        shifts.append(guide_count - len(tokens))
    source, target = _outputs(pipe, contexts), _outputs(pipe, guided)
    length = source.shape[1]
    inputs, guides = [], []
    for i, (start, shift) in enumerate(zip(starts, shifts)):
        places = torch.arange(start, length)
        inputs.append(source[i, places])
        guides.append(target[i, (places + shift).clamp(start, length - 1)])
    return torch.cat(inputs), torch.cat(guides)


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
    """New weights of every cross-attention `to_k` and `to_v` (diffusers names) that erase `concept` from the
    `contexts` prompts towards `guide`, keeping the `preserve` prompts' keys and values.

    The edit is solved on the map each projection applies (`read_weight`). Under a peft LoRA layer
    the new weight is its base layer's, shifted so that base plus adapter give the solved map; the
    erasure then belongs to the model with that LoRA (its fingerprint counts the adapter).
    """
    if not contexts:
        raise ValueError("UCE needs at least one context prompt that names the concept, e.g. 'a photo of a circle'")
    inputs, guides = erase_pairs(pipe, concept, guide, contexts)
    kept = _outputs(pipe, preserve).flatten(0, 1) if preserve else None
    edited = {}
    for name, module in denoiser(pipe).named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            applied = read_weight(module)
            solved = ridge_edit(applied, inputs, guides @ applied.double().T, kept, lam, erase_scale, preserve_scale)
            if hasattr(module, "base_layer"):
                base = module.base_layer.weight.detach()
                solved = (base.double() + solved.double() - applied.double()).to(base.dtype)
            edited[f"{name}.weight"] = solved
    if not edited:
        raise ValueError("this UNet has no cross-attention key/value projections (attn2.to_k, attn2.to_v) for UCE to edit")
    return edited
