"""The attention processor installed in every layer: the processor it replaces, plus a controller.

It keeps every step of diffusers' AttnProcessor2_0 (spatial norm, 4-D input, group norm,
norm_cross, norm_q/k, the attention mask, to_out, residual connection, output rescale), reads the
projections the replaced processor reads (`to_qkv` / `to_kv` after `fuse_qkv_projections`), and
adds an IP-Adapter's image attention when it replaces an IP-Adapter processor. So with a
controller that needs nothing it computes exactly what the stock processor computes.

It runs outside `torch.compile`'s graphs: the controller's per-step decisions are Python state
that a compiled graph would otherwise be specialised on, and recompiled for, at every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xattn.controller import Controller
from xattn.ip_adapter import image_attention, split_context
from xattn.sites import Layer, Site


def controlled(controller: Controller, state, site: Site, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
    """Attention output (batch, heads, queries, head_dim): the controller's where it handles the site, else fused SDPA."""
    if controller.handles(site):
        return controller.attend_batch(site, query, key, value, mask, state.layout.cond(query.shape[0]))
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)


class XAttnProcessor:
    """A UNet's or a DiT's `Attention` layer (self or cross) as its stock processor computes it, plus a controller."""

    def __init__(self, layer: Layer, controller: Controller, state, fused: bool = False, image_branch=None) -> None:
        self.layer = layer
        self.controller = controller
        self.state = state
        self.fused = fused
        self.image_branch = image_branch

    def _projections(self, attn, hidden_states, context):
        """Query, key and value as the replaced processor computes them: separate or fused projections."""
        if not self.fused:
            source = hidden_states if context is None else context
            return attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)
        if context is None:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return (attn.to_q(hidden_states), *attn.to_kv(context).chunk(2, dim=-1))

    @torch.compiler.disable
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, ip_adapter_masks=None, *args, **kwargs):
        residual = hidden_states
        images = None
        if self.image_branch is not None and encoder_hidden_states is not None:
            encoder_hidden_states, images = split_context(self.image_branch, encoder_hidden_states)
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is not None and attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = self._projections(attn, hidden_states, encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        site = Site(self.layer, self.state.grid(query.shape[2]), self.state.step, attn.scale)
        hidden_states = controlled(self.controller, self.state, site, query, key, value, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if images is not None:
            extra = image_attention(self.image_branch, query, images, ip_adapter_masks, attn.heads)
            if extra is not None:
                hidden_states = hidden_states + extra
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
