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

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editors.blend import region
from editors.edits import BatchEdit, CrossEdit, edited_probs, fused_outputs, injected_rows, lay_out
from editors.joint_edits import input_projection_inputs, joint_edit_outputs, joint_edited_probs
from xattn.controller import Controller, attention_and_logsumexp, explicit_probs, logsumexp_scores, probs_block
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
    """On MM-DiT joint attention (SD3, Flux), joint_edit "p2p": the cross-attention edits act on the image x text block
    of the joint softmax and self-attention injection on its image x image block (`editors.joint_edits`); "projection":
    Shin et al.'s edit instead, inside the self-attention window each target attends with the source's image queries
    and keys (its own values and text stream), and the word edits are not applied. `joint_blocks` ({stream: block
    indices}) limits either to those blocks; the others attend as their own."""

    JOINT_EDITS = ("p2p", "projection")

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
        joint_edit: str = "p2p",
        joint_blocks: Mapping[str, Collection[int]] | None = None,
    ) -> None:
        if joint_edit not in self.JOINT_EDITS:
            raise ValueError(f"joint_edit is one of {', '.join(self.JOINT_EDITS)}; got {joint_edit!r}")
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
        self.joint_edit = joint_edit
        self.joint_blocks = None if joint_blocks is None else {stream: frozenset(b) for stream, b in joint_blocks.items()}
        self.blend_maps: torch.Tensor | None = None
        self.subtract_maps: torch.Tensor | None = None
        self._step_edits: tuple[tuple[int, int], list[CrossEdit]] = ((-1, 0), [])
        self._plans: tuple[int, dict[tuple, BatchEdit]] = (-1, {})

    @property
    def steps(self) -> int:
        return self.schedules.shape[1]

    def handles(self, site: Site) -> bool:
        if not 0 <= site.step < self.steps:
            raise ValueError(f"this edit was scheduled for {self.steps} steps; the pipeline is at step {site.step}")
        if site.kind == "self":
            return self._injects_self(site)
        if site.kind == "joint" and (self.joint_edit == "projection" or not self._edits_block(site)):
            return self._needs_probs(site) or (self._edits_block(site) and self._injects_self(site))
        return self._needs_probs(site) or self._injecting[site.step] or (site.kind == "joint" and self._injects_self(site))

    def _edits_block(self, site: Site) -> bool:
        return self.joint_blocks is None or site.layer.block in self.joint_blocks.get(site.layer.stream, ())

    def _injects_self(self, site: Site) -> bool:
        return self.self_window[0] <= site.step < self.self_window[1] and max(site.resolution) <= self.self_resolution

    def _needs_probs(self, site: Site) -> bool:
        return self.explicit or self.store is not None or self._records(site)

    def _records(self, site: Site) -> bool:
        return self.blend is not None and max(site.resolution) == self.blend.side

    def attend_batch(self, site: Site, query, key, value, mask, cond: slice):
        rows = cond.stop - cond.start
        if rows != (len(self.edits) + 1) * self.images:
            raise ValueError(f"the batch has {rows} conditional rows; this edit needs 1 source + {len(self.edits)} target(s), "
                             f"{self.images} image(s) each")
        if site.kind == "joint":
            return self._attend_joint(site, query, key, value, mask, cond)
        if site.kind == "self" or not self._needs_probs(site):
            return fused_outputs(self._plan(site, value, query.shape[0], cond.start), query, key, value, mask)
        return super().attend_batch(site, query, key, value, mask, cond)

    def attend(self, site: Site, query, key, value, mask):
        """The conditional rows where someone reads the maps: explicit probabilities, then the fused output."""
        probs = explicit_probs(query, key, mask, site.scale)
        k = self.images
        edits = self._edits_at(site.step, key.shape[2])
        edited = [edited_probs(e, probs[j], probs[i * k + j]) for i, e in enumerate(edits, start=1) for j in range(k)]
        rows = torch.stack([*probs[:k], *edited])  # every conditional row's map as the edit makes it
        if self.store is not None:
            self.store.record(site, rows)
        if self._records(site):
            self._record(site, rows)
        if self.explicit:
            return rows.to(value) @ value
        return fused_outputs(self._plan(site, value, query.shape[0], 0), query, key, value, mask)

    def _attend_joint(self, site: Site, query, key, value, mask, cond: slice) -> torch.Tensor:
        """A joint layer: the unconditional rows, the source's and the targets' text queries attend as their own; the
        targets' image queries as `editors.joint_edits` edits them (explicit probabilities where `explicit`)."""
        if mask is not None:
            raise ValueError(f"{site.name} was called with an attention mask; Prompt-to-Prompt on joint attention takes none")
        if self.joint_edit == "projection" or not self._edits_block(site):
            return self._attend_projected(site, query, key, value, cond, self._edits_block(site) and self._injects_self(site))
        k, first = self.images, cond.start + self.images
        edits = self._edits_at(site.step, site.text.stop - site.text.start)
        inject = self._injects_self(site)
        if self.store is not None or self._records(site):
            self._record_joint(site, query[cond], key[cond], edits)
        uncond = F.scaled_dot_product_attention(query[: cond.start], key[: cond.start], value[: cond.start], scale=site.scale)
        if self.explicit:
            probs = explicit_probs(query[cond], key[cond], None, site.scale)
            edited = [joint_edited_probs(e, probs[j], probs[i * k + j], site.image, site.text, inject)
                      for i, e in enumerate(edits, start=1) for j in range(k)]
            return torch.cat([uncond, torch.stack([*probs[:k], *edited]).to(value.dtype) @ value[cond]])
        sources = slice(cond.start, first)
        own, lse = attention_and_logsumexp(query[sources], key[sources], value[sources], None, site.scale)
        source = (query[sources], key[sources], lse[..., site.image])
        targets = [slice(first + i * k, first + (i + 1) * k) for i in range(len(edits))]
        edited = [joint_edit_outputs(e, source, (query[t], key[t], value[t]), site.image, site.text, site.scale, inject)
                  for e, t in zip(edits, targets)]
        return torch.cat([uncond, own.to(uncond.dtype), *edited])

    def _attend_projected(self, site: Site, query, key, value, cond: slice, project: bool) -> torch.Tensor:
        """A joint layer with the targets' image queries and keys the source's where `project` (Shin et al.'s edit),
        else every row's own attention; fused, or explicit where `explicit`."""
        if project:
            k, first = self.images, cond.start + self.images
            source = (query[cond.start : first], key[cond.start : first])
            pairs = [input_projection_inputs(source, (query[t], key[t]), site.image)
                     for t in (slice(first + i * k, first + (i + 1) * k) for i in range(len(self.edits)))]
            query = torch.cat([query[:first], *(pair[0] for pair in pairs)])
            key = torch.cat([key[:first], *(pair[1] for pair in pairs)])
        if self.store is not None or self._records(site):
            self._record_joint(site, query[cond], key[cond], None)
        if self.explicit:
            return explicit_probs(query, key, None, site.scale).to(value.dtype) @ value
        return F.scaled_dot_product_attention(query, key, value, scale=site.scale)

    def _record_joint(self, site: Site, query, key, edits: list[CrossEdit] | None) -> None:
        """The conditional rows' image x text blocks as the edit makes them (blocks of the joint softmax, normalised
        over all keys; each row's own where `edits` is None), to the store and to local blending."""
        images = query[:, :, site.image]
        blocks = probs_block(images, key[:, :, site.text], logsumexp_scores(images, key, None, site.scale), site.scale)
        k = self.images
        rows = blocks
        if edits is not None:
            edited = [blocks[j] @ e.source.to(blocks) + blocks[i * k + j] * e.own.to(blocks) for i, e in enumerate(edits, start=1) for j in range(k)]
            rows = torch.stack([*blocks[:k], *edited])
        if self.store is not None:
            self.store.record(site, rows, "cross")
        if self._records(site):
            self._record(site, rows)

    def _edits_at(self, step: int, tokens: int) -> list[CrossEdit]:
        """Each target's edit over a layer's `tokens` text tokens with this step's schedule applied, made once per step
        for all layers. Tokens past the edit's (SD3's zero positions where T5 is absent) follow its last, padding."""
        if self._step_edits[0] != (step, tokens):
            edits = []
            for edit, schedule in zip(self.edits, self.schedules[:, step]):
                if tokens > len(schedule):
                    schedule = torch.cat([schedule, schedule[-1:].expand(tokens - len(schedule))])
                edits.append(edit.over(tokens).at(schedule[:tokens].to(edit.source)))
            self._step_edits = ((step, tokens), edits)
        return self._step_edits[1]

    def _plan(self, site: Site, value: torch.Tensor, batch: int, first: int) -> BatchEdit:
        """This step's edit laid over a batch of `batch` rows whose conditional rows start at `first`:
        made once per step, kind of attention and batch layout, not per layer call. Self-attention
        injection gives every target the source's map, cross-attention the step's edits."""
        if self._plans[0] != site.step:
            self._plans = (site.step, {})
        tokens = value.shape[2]
        key = (site.kind, batch, first, tokens, value.dtype, value.device)
        plans = self._plans[1]
        if key not in plans:
            edits = self._edits_at(site.step, tokens)
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
