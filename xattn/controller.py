"""The controller protocol: what a processor asks at each attention call.

A processor runs one fused SDPA over the whole batch unless its controller `handles` the site.
Then it asks the controller's `attend_batch` for the whole batch's output. By default the
unconditional rows still run fused and `attend` computes the output of the conditional rows: it
may compute explicit probabilities to record them, or rewrite queries, keys and values to edit
attention in fused form. A controller whose edit can cover the whole batch in one fused call
overrides `attend_batch` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xattn.sites import Site


class Controller:
    """Does nothing: every layer runs fused SDPA. Subclasses override what they need."""

    def handles(self, site: Site) -> bool:
        """Whether `attend` computes this site's conditional rows (else the whole layer runs fused)."""
        return False

    def attend(self, site: Site, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention output of the conditional rows: (rows, heads, queries, head_dim) from (rows, heads, tokens, head_dim)."""
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)

    def attend_batch(self, site: Site, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, cond: slice) -> torch.Tensor:
        """Attention output of the whole batch, whose conditional rows are `cond`: those from `attend`, the rest fused."""
        out = self.attend(site, query[cond], key[cond], value[cond], None if mask is None else mask[cond])
        if cond.start == 0:
            return out
        uncond = slice(0, cond.start)
        rest = F.scaled_dot_product_attention(query[uncond], key[uncond], value[uncond], attn_mask=None if mask is None else mask[uncond])
        return torch.cat([rest, out.to(rest.dtype)])


def explicit_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) in float32, shape (rows, heads, queries, keys)."""
    scores = (query.float() * scale) @ key.float().transpose(-1, -2)  # scaling the queries: fewer elements than the scores
    if mask is not None:
        scores = scores + mask.float()
    return scores.softmax(-1)
