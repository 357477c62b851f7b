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
    """Does nothing: every layer runs fused SDPA. Subclasses override what they need.

    `joint`: whether `attend` understands joint sites (MM-DiT: one softmax over the image and text tokens that the
    site's `image` and `text` slices locate); attach refuses a controller without it on such a denoiser.
    """

    joint = True

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


def attention_and_logsumexp(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's output and each query's log-sum-exp of its scores over all keys (float32, (rows, heads, queries)).

    On CPU both come from the one fused kernel that SDPA itself runs there, so the output is SDPA's to the bit and no
    probability matrix is ever materialised; elsewhere SDPA gives the output and `logsumexp_scores` the rest.
    """
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False, attn_mask=mask, scale=scale)[:2]
        return out, lse
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale), logsumexp_scores(query, key, mask, scale)


def logsumexp_scores(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float, chunk: int = 1024) -> torch.Tensor:
    """log sum_j exp(q_i k_j * scale + mask_ij) over all keys j, per query, in float32; `chunk` queries at a time, so
    memory stays at chunk x keys per head."""
    parts = []
    for start in range(0, query.shape[2], chunk):
        scores = (query[:, :, start : start + chunk].float() * scale) @ key.float().transpose(-1, -2)
        if mask is not None:
            scores = scores + (mask if mask.shape[-2] == 1 else mask[..., start : start + chunk, :]).float()
        parts.append(scores.logsumexp(-1))
    return torch.cat(parts, -1)


def probs_block(query: torch.Tensor, key: torch.Tensor, logsumexp: torch.Tensor, scale: float) -> torch.Tensor:
    """The softmax probabilities at these queries and keys only, (rows, heads, queries, keys), given the queries'
    log-sum-exp over every key: a block of the full matrix, normalised over all keys as the model normalises it."""
    scores = (query.float() * scale) @ key.float().transpose(-1, -2)
    return scores.sub_(logsumexp[..., None]).exp_()  # in place: these blocks are the largest tensors tracing makes
