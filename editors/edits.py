"""Prompt-to-Prompt's cross-attention edits as linear maps, computed with fused attention.

Every edit of the paper gives a target's cross-attention map as

    P' = P_src @ A + P_tgt * b          (A: tokens x tokens, b: one weight per token)

- word swap: A = the swap mapper M, b = 0;
- refinement: A selects each kept token's source column, b = 1 for the tokens the target adds;
- re-weighting: A and b of the edit it refines (the identity on the source when alone) times
  the word weights, without renormalising, as in the paper;
- an injection schedule at a step: tokens outside their window get A = 0 and b = 1.

So the layer output P' V = SDPA(Q_src, K_src, A V) + SDPA(Q_tgt, K_tgt, b V): fused calls, no
probabilities in memory. `lay_out` turns one step's edits into a `BatchEdit` over the whole attention
batch, unconditional rows included, once per step; `fused_outputs` then computes a layer with one
SDPA call (two where a target keeps some of its own attention), as plain generation does.
`edited_probs` gives P' itself: the explicit reference, recorded maps and local blending read it.
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

    def over(self, tokens: int) -> CrossEdit:
        """The edit on the `tokens` text tokens a layer attends over. Past those the pipeline encoded (PixArt's T5
        tokenizer counts 512, its pipeline encodes 120) no token carries a word of the prompt; tokens past the edit's
        own (SD3's zeros where T5 is absent) take the source's attention, as padding does."""
        size = self.own.shape[0]
        if tokens <= size:
            return self if tokens == size else CrossEdit(self.source[:tokens, :tokens], self.own[:tokens])
        source = torch.eye(tokens, dtype=self.source.dtype)
        source[:size, :size] = self.source
        return CrossEdit(source, torch.cat([self.own, self.own.new_zeros(tokens - size)]))


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


@dataclass(frozen=True)
class BatchEdit:
    """Edits laid over a whole attention batch: row r attends with the queries and keys of row
    `rows[r]`; the last len(mix) rows (the targets) do so over mixed values, `mix[i] @ V` for the
    i-th of them (None: no row's values are mixed); each row of `own_rows` adds its own attention over
    `own * V`. Rows nobody edits read themselves."""

    rows: torch.Tensor
    mix: torch.Tensor | None = None
    own_rows: torch.Tensor | None = None
    own: torch.Tensor | None = None

    def to(self, like: torch.Tensor) -> BatchEdit:
        """On `like`'s device, the weights in its dtype: done once per step, not per layer."""

        def index(t):
            return None if t is None else t.to(like.device)

        def weights(t):
            return None if t is None else t.to(like)

        return BatchEdit(index(self.rows), weights(self.mix), index(self.own_rows), weights(self.own))


def injected_rows(batch: int, first: int, targets: int, images: int = 1) -> BatchEdit:
    """Self-attention injection: with `images` images per prompt, the conditional rows from `first` on are the
    source's images, then each target's; image j of every target reads image j of the source."""
    rows = torch.arange(batch)
    for target in range(1, targets + 1):
        start = first + target * images
        rows[start : start + images] = torch.arange(first, first + images)
    return BatchEdit(rows)


def lay_out(edits: Sequence[CrossEdit], batch: int, first: int, images: int = 1) -> BatchEdit:
    """Cross-attention edits over a batch of `batch` rows whose conditional rows start at `first`:
    the source's `images` images there, then those of the target of each edit, the last rows of
    the batch. The other rows keep their own attention. A target whose map is the source's own,
    token for token (a swap of words of as many tokens), needs no mixing of its values; when none
    needs it, no row is mixed."""
    rows_needed = first + (1 + len(edits)) * images
    if rows_needed != batch:
        raise ValueError(f"{len(edits)} target(s) after a source at row {first}, {images} image(s) each, fill {rows_needed} rows, "
                         f"not the batch's {batch}")
    rows = injected_rows(batch, first, len(edits), images).rows
    identity = torch.eye(edits[0].source.shape[0])
    mix = None
    if not all(torch.equal(edit.source, identity) for edit in edits):
        mix = torch.stack([edit.source for edit in edits]).repeat_interleave(images, 0)
    owning = [i for i, edit in enumerate(edits) if edit.own.any()]
    if not owning:
        return BatchEdit(rows, mix)
    own_rows = [first + (i + 1) * images + j for i in owning for j in range(images)]
    return BatchEdit(rows, mix, torch.tensor(own_rows), torch.stack([edits[i].own for i in owning]).repeat_interleave(images, 0))


def fused_outputs(plan: BatchEdit, query, key, value, mask=None) -> torch.Tensor:
    """The layer output of every row of a (rows, heads, queries|tokens, dim) batch under `plan`.

    One SDPA call covers every term that reads a map of the batch: the queries and keys of the
    rows each row reads, with its mixed values. (Putting several rows' values side by side in one
    row would save repeating the queries, but a value width other than the query's sends PyTorch
    to its slow math kernel.) The rows that keep some of their own attention share one more call.
    """
    shared = value
    if plan.mix is not None:
        first = value.shape[0] - plan.mix.shape[0]
        shared = torch.cat([value[:first], plan.mix[:, None] @ value[first:]])
    outputs = F.scaled_dot_product_attention(
        query.index_select(0, plan.rows), key.index_select(0, plan.rows), shared, attn_mask=None if mask is None else mask.index_select(0, plan.rows)
    )
    if plan.own_rows is None:
        return outputs
    own = plan.own_rows
    scaled = plan.own[:, None, :, None] * value.index_select(0, own)
    extra = F.scaled_dot_product_attention(
        query.index_select(0, own), key.index_select(0, own), scaled, attn_mask=None if mask is None else mask.index_select(0, own)
    )
    return outputs.index_add(0, own, extra)


def edited_probs(edit: CrossEdit, p_src: torch.Tensor, p_tgt: torch.Tensor) -> torch.Tensor:
    """P' itself, from explicit (..., queries, tokens) maps: the reference, recorded maps and local blending read it."""
    return p_src @ edit.source.to(p_src) + p_tgt * edit.own.to(p_tgt)
