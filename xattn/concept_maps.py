"""ConceptAttention (Helbling et al. 2025): saliency maps of concept words from the output space of MM-DiT attention.

Each concept word ("circle", "background", ...) becomes one token: its first token as the pipeline encodes the word
alone, through the denoiser's `context_embedder`. The concept tokens run as a third stream through every
double-stream block with the text stream's own weights: the block's context modulation (`norm1_context`, from the
block's time embedding), the text projections `add_q/k/v_proj` and their qk-norm, `to_add_out`, `norm2_context`
and `ff_context`; a `context_pre_only` block (SD3's last) leaves the stream as it is. Concept queries attend over
the concept and the image keys only, so neither the image nor the text sees them and the picture is unchanged. At a
chosen block the map is the dot product of the image tokens' attention output (heads concatenated, before `to_out`)
with each concept's, softmax over the concepts; the maps add up over steps and the chosen blocks like any other.

As the authors' Flux code does, with two deviations: the block's own time embedding conditions the concept stream
(their Flux code zeroes the pooled text vector there), and on SD3, whose code takes the image side from a second
concept-image attention call, the image side is the text-image output here too. The single-stream blocks, where the
authors drop the concept stream, are skipped.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from xattn.denoiser import called_denoiser, denoiser
from xattn.families import family_of
from xattn.sites import Layer, Site
from xattn.tokens import pipeline_word_tokens


def concept_embeddings(pipe, concepts: Sequence[str]) -> torch.Tensor:
    """(concepts, width): each concept word's first token as the pipeline's text encoders give it for the word alone."""
    if not concepts:
        raise ValueError("name at least one concept word, e.g. concepts=['circle', 'square', 'background']")
    accepted = inspect.signature(pipe.encode_prompt).parameters
    options = {k: v for k, v in (("prompt_2", None), ("prompt_3", None), ("do_classifier_free_guidance", False)) if k in accepted}
    rows = []
    with torch.no_grad():
        for concept in concepts:
            embeds = pipe.encode_prompt(prompt=[concept], **options)[0]
            rows.append(embeds[0, pipeline_word_tokens(pipe, concept, concept)[0]])
    return torch.stack(rows)


def chosen_blocks(pipe, blocks: Sequence[int] | None) -> list[int]:
    """The double-stream blocks whose maps count: the last four by default (the authors' 15-18 of Flux's 19)."""
    count = len(family_of(pipe).double_blocks(denoiser(pipe)))
    if count == 0:
        raise ValueError(f"ConceptAttention runs on joint (MM-DiT) attention, SD3 and Flux; {type(denoiser(pipe)).__name__} has none")
    if blocks is None:
        return list(range(max(0, count - 4), count))
    unknown = sorted(set(blocks) - set(range(count)))
    if unknown:
        raise ValueError(f"no double-stream block {unknown}; this model's are 0..{count - 1}")
    return sorted(set(blocks))


def concept_output(block, stream: torch.Tensor, temb: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """The concept tokens' attention output (rows, concepts, width) over the concept and image keys, and the block's
    context modulation of the stream (None for a `context_pre_only` block)."""
    attn = block.attn
    if getattr(block, "context_pre_only", False):
        normed, modulation = block.norm1_context(stream, temb), None
    else:
        normed, *modulation = block.norm1_context(stream, emb=temb)
    heads = keys.shape[1]
    query, key, value = (p(normed).unflatten(-1, (heads, -1)).transpose(1, 2) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_added_q is not None:
        query, key = attn.norm_added_q(query), attn.norm_added_k(key)
    out = F.scaled_dot_product_attention(query, torch.cat([key, keys.to(key)], 2), torch.cat([value, values.to(value)], 2))
    return out.transpose(1, 2).flatten(2), modulation


def advanced(block, stream: torch.Tensor, concept_out: torch.Tensor, modulation: tuple | None) -> torch.Tensor:
    """The concept stream after the block's attention and feed-forward, as the block updates its text stream."""
    if modulation is None:
        return stream
    gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
    stream = stream + gate_msa[:, None] * block.attn.to_add_out(concept_out)
    fed = block.norm2_context(stream) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return stream + gate_mlp[:, None] * block.ff_context(fed)


def concept_saliency(image_out: torch.Tensor, concept_out: torch.Tensor) -> torch.Tensor:
    """(rows, images, concepts): each image token's dot product with each concept's output, softmax over the concepts."""
    return (image_out.float() @ concept_out.float().transpose(1, 2)).softmax(-1)


class ConceptStream:
    """The concept tokens of the current denoiser call, advanced block by block; the maps go to `store`.

    The store's processor hands each double-stream layer's image keys, values and outputs (conditional rows) to
    `keep`; a forward hook on each block then advances the stream and records the block's map if it is chosen.
    """

    def __init__(self, embeds: torch.Tensor, names: Sequence[str], blocks: Sequence[int]) -> None:
        self.embeds, self.names, self.blocks = embeds, list(names), set(blocks)
        self.stream: torch.Tensor | None = None
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def keep(self, layer: str, keys: torch.Tensor, values: torch.Tensor, outputs: torch.Tensor) -> None:
        """A layer's image keys and values (rows, heads, images, head_dim; after qk-norm and RoPE) and outputs."""
        self.kept[layer] = (keys.detach(), values.detach(), outputs.detach())

    @contextmanager
    def installed(self, pipe, store, state) -> Iterator[None]:
        """Hooks on the denoiser (a call starts the stream) and on each double-stream block (advance, record)."""
        model = denoiser(pipe)
        called = called_denoiser(pipe)

        def begin(module, args, kwargs):
            cond = state.layout.cond(state.rows)
            rows = cond.stop - cond.start
            embedded = model.context_embedder(self.embeds.to(model.context_embedder.weight))
            self.stream, self.kept = embedded[None].expand(rows, -1, -1), {}

        def after(index: int, name: str):
            def hook(block, args, kwargs, output):
                keys, values, outputs = self.kept.pop(f"{name}.attn")
                temb = kwargs["temb"][-self.stream.shape[0]:]  # the conditional rows are the last ones
                with torch.no_grad():
                    concept_out, modulation = concept_output(block, self.stream, temb, keys, values)
                    if index in self.blocks:
                        image_out = outputs.transpose(1, 2).flatten(2)
                        site = Site(Layer(name, "concept", "transformer", index, "double"), state.grid(image_out.shape[1]), state.step, 1.0)
                        store.record(site, concept_saliency(image_out, concept_out)[:, None])
                    self.stream = advanced(block, self.stream, concept_out, modulation)
            return hook

        handles = [called.register_forward_pre_hook(begin, with_kwargs=True)]
        for index, (name, block) in enumerate(family_of(pipe).double_blocks(model)):
            handles.append(block.register_forward_hook(after(index, name), with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.stream, self.kept = None, {}
