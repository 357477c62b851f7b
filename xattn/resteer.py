"""Forget-Me-Not's attention re-steering loss: how much attention every cross-attention layer pays
to a concept's tokens, kept in the autograd graph so that training can drive it to zero. In MM-DiT
joint attention it is the image queries' probabilities at the concept's text keys, the softmax over
the joint key set as the model takes it.

The probabilities are (rows, heads, queries, tokens), batch-major, and each row has its own token
columns: the concept may sit at different places in the prompts of one batch. (FMN's code repeats
a sample-major mask over a head-major batch, which picks the wrong rows when prompts differ.)
"""

from __future__ import annotations

import torch

from xattn.controller import Controller, explicit_probs
from xattn.sites import Site


def resteer_loss(squares: list[torch.Tensor]) -> torch.Tensor:
    """FMN's loss: the L2 norm (not its square) of all the concept-token probabilities, from each layer's
    per-row sums of squares."""
    return torch.stack(squares).sum().sqrt()


class ConceptAttention(Controller):
    """Records, for every cross-attention (or joint attention) layer, the per-row sum of squared image-query
    probabilities at `columns`.

    columns: (rows, text tokens) boolean, True at each row's concept tokens.
    """

    def __init__(self, columns: torch.Tensor) -> None:
        self.columns = columns
        self.squares: list[torch.Tensor] = []

    def handles(self, site: Site) -> bool:
        return site.kind in ("cross", "joint")

    def attend(self, site: Site, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        tokens = key.shape[2] if site.text is None else site.text.stop - site.text.start
        if self.columns.shape != (query.shape[0], tokens):
            raise ValueError(f"concept columns are {tuple(self.columns.shape)} but the layer has {query.shape[0]} rows of {tokens} text tokens")
        probs = explicit_probs(query, key, mask, site.scale)
        read = probs if site.text is None else probs[:, :, site.image, site.text]
        chosen = read * self.columns[:, None, None, :].to(probs.dtype)
        self.squares.append(chosen.square().sum((1, 2, 3)))
        return probs.to(value.dtype) @ value

    def take(self) -> torch.Tensor:
        """The loss over the layers recorded since the last take; then forget them."""
        if not self.squares:
            raise ValueError("no cross-attention layer ran while the concept attention was attached")
        loss, self.squares = resteer_loss(self.squares), []
        return loss
