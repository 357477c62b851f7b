"""The Prompt-to-Prompt controller: conditional rows [source, target 1, target 2, ...], each prompt's
`images` images consecutive (image j of every target is edited from image j of the source).

Per the paper and google/prompt-to-prompt: only the conditional rows are edited (the
unconditional rows keep their own attention), the source row is never changed, cross-attention
edits act at every resolution, and self-attention injection (the target's self-attention map is
the source's) acts inside its step window at resolutions up to a limit. Everything runs fused
(editors.edits); `explicit=True` computes the same with explicit probabilities, as a reference.
Fixed from the original: the step comes from the pipeline, not from counting calls, and local
blending reads the maps of the resolution nearest to the one asked for, at any image size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from editors.blend import region
from editors.edits import BatchEdit, CrossEdit, edited_probs, fused_outputs, injected_rows, lay_out
from xattn.controller import Controller, explicit_probs
from xattn.sites import Site
from xattn.store import AttentionStore


@dataclass(frozen=True)
class BlendTokens:
    """Token indices local blending reads: the source's words, each target's words and subtracted words."""

    source: tuple[int, ...]
    targets: tuple[tuple[int, ...], ...]
    subtract: tuple[tuple[int, ...], ...]
    side: int


class PromptToPrompt(Controller):
    joint = False

    def __init__(
        self,
        edits: Sequence[CrossEdit],
        schedules: torch.Tensor,
        self_window: tuple[int, int],
        self_resolution: int,
        blend: BlendTokens | None = None,
        explicit: bool = False,
        store: AttentionStore | None = None,
        images: int = 1,
    ) -> None:
        if schedules.shape[0] != len(edits):
            raise ValueError(f"{len(edits)} edits but {schedules.shape[0]} schedules; give one per target prompt")
        self.edits = list(edits)
        self.images = images
        self.schedules = schedules
        self._injecting = schedules.any(2).any(0).tolist()  # per step: does any target take any source attention (asked per layer call)
        self.self_window = self_window
        self.self_resolution = self_resolution
        self.blend = blend
        self.explicit = explicit
        self.store = store
        self.blend_maps: torch.Tensor | None = None
        self.subtract_maps: torch.Tensor | None = None
        self._step_edits: tuple[int, list[CrossEdit]] = (-1, [])
        self._plans: tuple[int, dict[tuple, BatchEdit]] = (-1, {})

    @property
    def steps(self) -> int:
        return self.schedules.shape[1]

    def handles(self, site: Site) -> bool:
        if not 0 <= site.step < self.steps:
            raise ValueError(f"this edit was scheduled for {self.steps} steps; the pipeline is at step {site.step}")
        if site.kind == "self":
            return self.self_window[0] <= site.step < self.self_window[1] and max(site.resolution) <= self.self_resolution
        return self._needs_probs(site) or self._injecting[site.step]

    def _needs_probs(self, site: Site) -> bool:
        return self.explicit or self.store is not None or self._records(site)

    def _records(self, site: Site) -> bool:
        return self.blend is not None and max(site.resolution) == self.blend.side

    def attend_batch(self, site: Site, query, key, value, mask, cond: slice):
        rows = cond.stop - cond.start
        if rows != (len(self.edits) + 1) * self.images:
            raise ValueError(f"the batch has {rows} conditional rows; this edit needs 1 source + {len(self.edits)} target(s), "
                             f"{self.images} image(s) each")
        if site.kind == "self" or not self._needs_probs(site):
            return fused_outputs(self._plan(site, value, query.shape[0], cond.start), query, key, value, mask)
        return super().attend_batch(site, query, key, value, mask, cond)

    def attend(self, site: Site, query, key, value, mask):
        """The conditional rows where someone reads the maps: explicit probabilities, then the fused output."""
        probs = explicit_probs(query, key, mask, site.scale)
        k = self.images
        edited = [edited_probs(e, probs[j], probs[i * k + j]) for i, e in enumerate(self._edits_at(site.step), start=1) for j in range(k)]
        rows = torch.stack([*probs[:k], *edited])  # every conditional row's map as the edit makes it
        if self.store is not None:
            self.store.record(site, rows)
        if self._records(site):
            self._record(site, rows)
        if self.explicit:
            return rows.to(value) @ value
        return fused_outputs(self._plan(site, value, query.shape[0], 0), query, key, value, mask)

    def _edits_at(self, step: int) -> list[CrossEdit]:
        """Each target's edit with this step's schedule applied, made once per step for all layers."""
        if self._step_edits[0] != step:
            self._step_edits = (step, [edit.at(self.schedules[i, step].to(edit.source)) for i, edit in enumerate(self.edits)])
        return self._step_edits[1]

    def _plan(self, site: Site, value: torch.Tensor, batch: int, first: int) -> BatchEdit:
        """This step's edit laid over a batch of `batch` rows whose conditional rows start at `first`:
        made once per step, kind of attention and batch layout, not per layer call. Self-attention
        injection gives every target the source's map, cross-attention the step's edits."""
        if self._plans[0] != site.step:
            self._plans = (site.step, {})
        key = (site.kind, batch, first, value.dtype, value.device)
        plans = self._plans[1]
        if key not in plans:
            edits = self._edits_at(site.step)
            plan = injected_rows(batch, first, len(edits), self.images) if site.kind == "self" else lay_out(edits, batch, first, self.images)
            plans[key] = plan.to(value)
        return plans[key]

    def _record(self, site: Site, probs: torch.Tensor) -> None:
        """Add this layer's blend-word maps (summed over the words' tokens, mean over heads) to the running sums:
        per conditional row, the source's words on the source's images and each target's on its own."""
        h, w = site.resolution
        blend, k = self.blend, self.images

        def word_map(row: torch.Tensor, tokens: tuple[int, ...]) -> torch.Tensor:
            return row[..., list(tokens)].sum(-1).mean(0).reshape(h, w).detach().float()

        words = [blend.source] * k + [t for t in blend.targets for _ in range(k)]
        maps = torch.stack([word_map(row, tokens) for row, tokens in zip(probs, words)])
        self.blend_maps = maps if self.blend_maps is None else self.blend_maps + maps
        if any(blend.subtract):
            subtract = [t for t in blend.subtract for _ in range(k)]
            sub = torch.stack([word_map(row, t) if t else torch.zeros(h, w) for row, t in zip(probs[k:], subtract)])
            self.subtract_maps = sub if self.subtract_maps is None else self.subtract_maps + sub

    def blend_region(self, latent: tuple[int, int], threshold: float, subtract_threshold: float) -> torch.Tensor:
        """(target rows, H, W) region the targets may change: union of source and target word regions, minus subtracted words."""
        if self.blend_maps is None:
            raise RuntimeError("no blend maps were recorded yet: local blending reads them from the first step on")
        words = region(self.blend_maps, latent, threshold, pool=True)
        k = self.images
        inside = words[:k].repeat(len(self.edits), 1, 1) | words[k:]
        if self.subtract_maps is not None:
            inside = inside & ~region(self.subtract_maps, latent, subtract_threshold, pool=False)
        return inside
