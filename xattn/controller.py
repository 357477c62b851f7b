"""The controller protocol: what a processor asks at each attention call.

A processor runs fused SDPA unless its controller says it needs the explicit probabilities of
that site; then it computes them once, hands them to the controller (which may record or
rewrite them) and uses what it gets back for the output.
"""

from __future__ import annotations

import torch

from xattn.sites import Site


class Controller:
    """Does nothing: every site runs fused. Subclasses override what they need."""

    def needs_probs(self, site: Site) -> bool:
        """Whether `on_probs` must see this site's probabilities (else the layer runs fused SDPA)."""
        return False

    def on_probs(self, site: Site, probs: torch.Tensor) -> torch.Tensor:
        """Read or rewrite probabilities of shape (rows, heads, queries, keys); return what the layer uses."""
        return probs
