"""IP-Adapter's decoupled image cross-attention, kept when xattn takes over a layer that has it.

diffusers' IPAdapterAttnProcessor(2_0) adds to the text cross-attention's output, for each loaded
adapter, scale * SDPA(Q, K_ip, V_ip) over that adapter's image tokens (per image, weighted by its
mask, when `ip_adapter_masks` are given). xattn records and edits the text attention only; this
term is added as the replaced processor computes it, from the same queries, with its scales and
projections, so that with nothing edited the layer's output is the stock one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.image_processor import IPAdapterMaskProcessor


def split_context(branch, context):
    """(text context, [image tokens per adapter]) from what the UNet passes an IP-Adapter layer:
    a (text, images) tuple, or the older single tensor with the first adapter's tokens at its end."""
    if isinstance(context, tuple):
        return context
    end = context.shape[1] - branch.num_tokens[0]
    return context[:, :end], [context[:, end:]]


def _heads(x: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    return x.view(batch, -1, heads, head_dim).transpose(1, 2)


def _rows(x: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    return x.transpose(1, 2).reshape(batch, -1, heads * head_dim)


def _masks(branch, masks, images: list[torch.Tensor]) -> list:
    if masks is None:
        return [None] * len(branch.scale)
    if not isinstance(masks, list):
        masks = list(masks.unsqueeze(1))
    if not len(masks) == len(branch.scale) == len(images):
        raise ValueError(f"{len(masks)} ip_adapter_masks for {len(branch.scale)} loaded IP-Adapter(s) and {len(images)} image input(s); "
                         "give one mask (from IPAdapterMaskProcessor) per adapter")
    for mask, state in zip(masks, images):
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[1] != state.shape[1]):
            raise ValueError("each ip_adapter_masks entry is a (1, images, height, width) tensor from IPAdapterMaskProcessor.preprocess, "
                             "one mask per image of its adapter")
    return masks


def image_attention(branch, query: torch.Tensor, images: list[torch.Tensor], masks, heads: int) -> torch.Tensor | None:
    """The image terms to add to the text attention's output (batch, queries, heads * head_dim); None when every scale is 0.

    query: (batch, heads, queries, head_dim), as the text attention used it.
    """
    batch, _, queries, head_dim = query.shape
    total = None
    for state, scale, to_k, to_v, mask in zip(images, branch.scale, branch.to_k_ip, branch.to_v_ip, _masks(branch, masks, images)):
        scales = scale if isinstance(scale, list) else [scale]
        if all(s == 0 for s in scales):
            continue
        if mask is None:
            term = _rows(F.scaled_dot_product_attention(query, _heads(to_k(state), batch, heads, head_dim),
                                                        _heads(to_v(state), batch, heads, head_dim)), batch, heads, head_dim)
            term = scale * term.to(query.dtype)
        else:
            scales = scales if isinstance(scale, list) else scales * mask.shape[1]
            term = 0
            for i in range(mask.shape[1]):
                attended = F.scaled_dot_product_attention(query, _heads(to_k(state[:, i]), batch, heads, head_dim),
                                                          _heads(to_v(state[:, i]), batch, heads, head_dim))
                attended = _rows(attended, batch, heads, head_dim).to(query.dtype)
                weight = IPAdapterMaskProcessor.downsample(mask[:, i], batch, queries, attended.shape[2]).to(query)
                term = term + scales[i] * (attended * weight)
        total = term if total is None else total + term
    return total
