"""Prompt-to-Prompt's cross-attention edits as linear maps, computed with fused attention.

Every edit of the paper gives a target's cross-attention map as

    P' = P_src @ A + P_tgt * b          (A: tokens x tokens, b: one weight per token)

- word swap: A = the swap mapper M, b = 0;
- refinement: A selects each kept token's source column, b = 1 for the tokens the target adds;
- re-weighting: A and b of the edit it refines (the identity on the source when alone) times
  the word weights, without renormalising, as in the paper;
- an injection schedule at a step: tokens outside their window get A = 0 and b = 1.

So the layer output P' V = SDPA(Q_src, K_src, A V) + SDPA(Q_tgt, K_tgt, b V): fused calls, no
probabilities in memory. `edited_probs` gives P' itself: the explicit reference, recorded maps and local
blending read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CrossEdit:
    """P' = P_src @ source + P_tgt * own, for one target prompt."""

    source: torch.Tensor
    own: torch.Tensor

    def at(self, injected: torch.Tensor) -> CrossEdit:
        """The edit at one step: tokens with injected == 0 keep the target's own attention."""
        return CrossEdit(self.source * injected[None, :], self.own * injected + (1 - injected))


def swap(mapper: torch.Tensor) -> CrossEdit:
    return CrossEdit(mapper, torch.zeros(mapper.shape[0]))


def refine(index: torch.Tensor, kept: torch.Tensor) -> CrossEdit:
    """From `xattn.align.refine_mapper`: kept tokens take their source column, new ones their own."""
    size = index.shape[0]
    source = torch.zeros(size, size)
    source[index, torch.arange(size)] = kept
    return CrossEdit(source, 1 - kept)


def reweight(weights: torch.Tensor, base: CrossEdit | None = None) -> CrossEdit:
    """Scale each token's column by its weight, on top of `base` (the source's own map when None)."""
    if base is None:
        base = CrossEdit(torch.eye(weights.shape[0]), torch.zeros(weights.shape[0]))
    return CrossEdit(base.source * weights[None, :], base.own * weights)


def fused_outputs(edits: Sequence[CrossEdit], query, key, value, mask=None) -> torch.Tensor:
    """The source row's output and P' V for each target, from (rows, heads, queries|tokens, dim) tensors.

    Row 0 is the source, row i the target of edits[i - 1]. Every term that reads the source's map
    is one row of a single SDPA call: the source's queries and keys, repeated, with values
    [V_src, A_1 V_1, ...]. (Putting those values side by side in one row would save the repeat,
    but a value width other than the query's sends PyTorch to its slow math kernel.) The targets
    that keep some of their own attention share one more call. A swap thus costs one fused call
    over its rows, as generation does.
    """
    rows = len(edits) + 1
    shared = torch.stack([value[0]] + [edit.source.to(v) @ v for edit, v in zip(edits, value[1:])])
    repeat = (rows, -1, -1, -1)
    outputs = F.scaled_dot_product_attention(
        query[:1].expand(repeat), key[:1].expand(repeat), shared, attn_mask=None if mask is None else mask[:1].expand(rows, *mask.shape[1:])
    )
    own = [i for i, edit in enumerate(edits, start=1) if edit.own.any()]
    if not own:
        return outputs
    scaled = torch.stack([edits[i - 1].own.to(value)[:, None] * value[i] for i in own])
    extra = F.scaled_dot_product_attention(query[own], key[own], scaled, attn_mask=None if mask is None else mask[own])
    return outputs.index_add(0, torch.tensor(own, device=outputs.device), extra)


def edited_probs(edit: CrossEdit, p_src: torch.Tensor, p_tgt: torch.Tensor) -> torch.Tensor:
    """P' itself, from explicit (..., queries, tokens) maps: the reference, recorded maps and local blending read it."""
    return p_src @ edit.source.to(p_src) + p_tgt * edit.own.to(p_tgt)
