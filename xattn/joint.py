"""Processors for MM-DiT joint attention: SD3/3.5's and Flux's, each computing what the stock one computes, plus a
controller.

One softmax runs over the image and the text tokens together, so a word's map is the image queries' probabilities at
that word's text keys, normalised over the joint key set as the model normalises it. The controller sees the joint
queries, keys and values (batch, heads, tokens, head_dim) and the site says where the image and the text tokens lie:
SD3 puts the image first, Flux the text. With nothing recorded or edited they run fused SDPA, as stock.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from xattn.controller import Controller
from xattn.processor import controlled
from xattn.sites import Layer, Site


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, heads * dim) as (batch, heads, tokens, dim)."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, dim) as (batch, tokens, heads * dim)."""
    return x.transpose(1, 2).flatten(2, 3)


def _projections(attn, x: torch.Tensor, added: bool, fused: bool) -> tuple[torch.Tensor, ...]:
    """Query, key and value of the image stream (or, `added`, the text stream), from separate or fused projections."""
    if fused:
        return (attn.to_added_qkv if added else attn.to_qkv)(x).chunk(3, dim=-1)
    if added:
        return attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


class SD3Processor:
    """SD3's JointAttnProcessor2_0 (separate or fused projections): image tokens, then the context stream's; the last
    block's context is `context_pre_only` (no output projection); SD3.5's qk-norm and its image-only `attn2`."""

    def __init__(self, layer: Layer, controller: Controller, state, fused: bool = False) -> None:
        self.layer, self.controller, self.state, self.fused = layer, controller, state, fused

    @torch.compiler.disable
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        query, key, value = (_heads(t, attn.heads) for t in _projections(attn, hidden_states, False, self.fused))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        images = hidden_states.shape[1]
        image_slice = text_slice = None
        if encoder_hidden_states is not None:
            context_query, context_key, context_value = (_heads(t, attn.heads) for t in _projections(attn, encoder_hidden_states, True, self.fused))
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            query = torch.cat([query, context_query], dim=2)
            key = torch.cat([key, context_key], dim=2)
            value = torch.cat([value, context_value], dim=2)
            image_slice, text_slice = slice(0, images), slice(images, key.shape[2])
        site = Site(self.layer, self.state.grid(images), self.state.step, attn.scale, image_slice, text_slice)
        out = _merge(controlled(self.controller, self.state, site, query, key, value, attention_mask)).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, context = out[:, :images], out[:, images:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](out)), context


class FluxProcessor:
    """Flux's FluxAttnProcessor (separate or fused projections): in a double-stream block the text stream's tokens,
    then the image's; in a single-stream block one sequence, text first, whose text length the denoiser's call gives.
    qk-norm on both, RoPE over the joint sequence."""

    def __init__(self, layer: Layer, controller: Controller, state) -> None:
        self.layer, self.controller, self.state = layer, controller, state

    @torch.compiler.disable
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in _projections(attn, hidden_states, False, attn.fused_projections))
        query, key = attn.norm_q(query), attn.norm_k(key)
        two_streams = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if two_streams:
            added = (t.unflatten(-1, (-1, attn.head_dim)) for t in _projections(attn, encoder_hidden_states, True, attn.fused_projections))
            context_query, context_key, context_value = added
            query = torch.cat([attn.norm_added_q(context_query), query], dim=1)
            key = torch.cat([attn.norm_added_k(context_key), key], dim=1)
            value = torch.cat([context_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text = encoder_hidden_states.shape[1] if two_streams else self.state.call.text
        tokens = query.shape[1]
        site = Site(self.layer, self.state.grid(tokens - text), self.state.step, 1 / attn.head_dim ** 0.5,
                    slice(text, tokens), slice(0, text))
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        out = _merge(controlled(self.controller, self.state, site, query, key, value, attention_mask)).to(query.dtype)
        if not two_streams:
            return out
        context, out = out[:, :text], out[:, text:]
        return attn.to_out[1](attn.to_out[0](out.contiguous())), attn.to_add_out(context.contiguous())
