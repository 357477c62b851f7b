"""Differentiable capture of the cross-attention layers at one query resolution, for guidance losses.

On MM-DiT joint attention (SD3, Flux) the map is the image queries' probabilities at the text keys, the softmax taken
over the joint key set as the model takes it, from every joint block or the chosen ones (`blocks`, per stream).

Only those layers compute explicit probabilities (of the conditional rows); every other layer
stays fused SDPA. With grad enabled the probabilities stay in the autograd graph, so a loss on
them has a gradient with respect to the latents. A guidance pass needs nothing after the last
captured layer, so `run(..., stop_early=True)` ends the UNet call there: on SD 1.x at 512 px,
whose 16x16 layers sit in the middle of the decoder, that skips the two largest up blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from xattn.controller import Controller, explicit_probs
from xattn.sites import Site


class _Captured(Exception):
    """Raised after the last captured layer to end a guidance pass's UNet call."""


class MapCapture(Controller):
    """Records, per denoiser call, the head-mean cross-attention probabilities of every layer at `side` (joint
    attention's image x text block; with `blocks`, {"double": [...], "single": [...]}, of those blocks only)."""

    def __init__(self, side: int, blocks: Mapping[str, Sequence[int]] | None = None) -> None:
        self.side = side
        self.blocks = blocks
        self._probs: list[torch.Tensor] = []
        self._resolution: tuple[int, int] | None = None
        self._names: list[str] = []
        self._last: str | None = None
        self._stop_after: str | None = None

    def handles(self, site: Site) -> bool:
        if site.kind == "joint":
            return self.blocks is None or site.block in self.blocks.get(site.stream, ())
        return site.kind == "cross" and max(site.resolution) == self.side

    def attend(self, site: Site, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        probs = explicit_probs(query, key, mask, site.scale)
        self._probs.append(probs.mean(1) if site.kind == "cross" else probs[:, :, site.image, site.text].mean(1))
        self._names.append(site.name)
        self._resolution = site.resolution
        if site.name == self._stop_after:
            raise _Captured
        return probs.to(value.dtype) @ value

    def take(self) -> torch.Tensor:
        """The maps recorded since the last take: mean over layers, (rows, h, w, keys); then forget them."""
        if not self._probs:
            raise ValueError(f"no cross-attention layer at {self.side}x{self.side} ran; choose a resolution the denoiser has")
        if self._last is None:
            self._last = self._names[-1]
        maps = torch.stack(self._probs).mean(0)
        self._probs, self._names = [], []
        return maps.reshape(maps.shape[0], *self._resolution, maps.shape[-1])

    def run(self, call: Callable[[], object], stop_early: bool = True) -> torch.Tensor:
        """Run one UNet call and return its maps; once the last layer at `side` is known, stop there."""
        self._probs, self._names = [], []
        self._stop_after = self._last if stop_early else None
        try:
            call()
        except _Captured:
            pass
        finally:
            self._stop_after = None
        return self.take()
