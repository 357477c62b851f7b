"""The attention store: running sums of attention maps, aggregated as they arrive.

In joint (MM-DiT) attention, the image queries' probabilities at the text keys are its cross-attention maps and
at the image keys its self-attention maps, each a block of one softmax over all keys. Only those blocks are
computed, from the queries' log-sum-exp over all keys; the layer's output stays fused SDPA: the full joint matrix
would take gigabytes per layer at SD3's and Flux's sizes.

By default it keeps, per (kind, resolution), one float32 sum over steps, layers and heads of the
conditional rows, shape (rows, queries, keys), and a count of what was added: memory does not
grow with the number of steps. Keeping steps, layers or heads apart is opt-in, and so is
recording self-attention (expensive: queries x queries per layer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from xattn.controller import Controller, attention_and_logsumexp, explicit_probs, probs_block
from xattn.sites import Layer, Site


@dataclass(frozen=True)
class Key:
    kind: str
    resolution: tuple[int, int]
    step: int | None
    layer: str | None


class AttentionStore(Controller):
    """Records cross-attention (and optionally self-attention) probabilities of the conditional rows.

    per_step / per_layer / heads keep steps, layers and heads apart so maps can later be selected
    by them; resolutions limits recording (and so the explicit computation) to some query grids;
    device holds the sums elsewhere than the model (e.g. "cpu" for a GPU model).
    """

    def __init__(
        self,
        *,
        self_attention: bool = False,
        per_step: bool = False,
        per_layer: bool = False,
        heads: bool = False,
        resolutions: Iterable[int] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.kinds = {"cross", "self"} if self_attention else {"cross"}
        self.per_step, self.per_layer, self.heads = per_step, per_layer, heads
        self.resolutions = None if resolutions is None else set(resolutions)
        self.device = device
        self.sums: dict[Key, torch.Tensor] = {}
        self.counts: dict[Key, int] = {}
        self.layers: dict[str, tuple[int, int]] = {}
        self.sites: dict[str, Layer] = {}
        self.concepts = None  # a ConceptStream, when ConceptAttention maps are traced

    def handles(self, site: Site) -> bool:
        wanted = site.kind in self.kinds or site.kind == "joint"
        return wanted and (self.resolutions is None or max(site.resolution) in self.resolutions)

    def attend(self, site: Site, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if site.kind == "joint":  # the image queries' blocks of one softmax over the joint key set, as the model takes it
            out, lse = attention_and_logsumexp(query, key, value, mask, site.scale)
            images, lse = query[:, :, site.image], lse[:, :, site.image]
            self.record(site, probs_block(images, key[:, :, site.text], lse, site.scale), "cross")
            if self.concepts is not None and site.stream == "double":
                self.concepts.keep(site.name, key[:, :, site.image], value[:, :, site.image], out[:, :, site.image])
            if "self" in self.kinds:
                self.record(site, probs_block(images, key[:, :, site.image], lse, site.scale), "self")
            return out
        probs = explicit_probs(query, key, mask, site.scale)
        self.record(site, probs)
        return probs.to(value.dtype) @ value

    def record(self, site: Site, probs: torch.Tensor, kind: str | None = None) -> None:
        """Add one call's probabilities (conditional rows, heads, queries, keys) to the sums, as `kind` (the site's own
        by default; a joint site's blocks are recorded as cross- and self-attention)."""
        maps = probs.detach()
        if not self.heads:
            maps = maps.mean(1)
        if self.device is not None:
            maps = maps.to(self.device)
        key = Key(kind or site.kind, site.resolution, site.step if self.per_step else None, site.name if self.per_layer else None)
        if key in self.sums:
            if self.sums[key].shape != maps.shape:
                raise ValueError(
                    f"this store holds maps of {self.sums[key].shape[0]} image(s) but this call has {maps.shape[0]}; "
                    "trace each differently sized pipeline call in its own block, or clear() the store between them"
                )
            self.sums[key].add_(maps)
            self.counts[key] += 1
        else:
            self.sums[key] = maps.clone()
            self.counts[key] = 1
        self.layers[site.name] = site.resolution
        self.sites[site.name] = site.layer

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())

    def select(
        self,
        kind: str = "cross",
        resolutions: Iterable[int] | None = None,
        layers: Iterable[str] | None = None,
        steps: tuple[int, int] | None = None,
        heads: Iterable[int] | None = None,
        blocks: Iterable[int] | None = None,
        streams: Iterable[str] | None = None,
    ) -> list[tuple[Key, torch.Tensor, int]]:
        """The recorded sums that match, as (key, head-averaged sum (rows, queries, keys), count).

        steps is a half-open range [start, stop). blocks are the layers' block indices (a transformer's
        `transformer_blocks.N`, Flux's `single_transformer_blocks.N` too), streams their joint-attention
        streams ("double", "single"). Selecting by layer, block, stream, step or head needs the store to
        have kept them apart; asking otherwise is a ValueError that says which option to set, and a block
        or stream that was not recorded is one that lists those that were.
        """
        if (layers is not None or blocks is not None or streams is not None) and not self.per_layer:
            raise ValueError("selecting layers, blocks or streams needs the maps kept per layer: record with per_layer=True")
        for name, wanted, field in (("block", blocks, "block"), ("stream", streams, "stream")):
            recorded = sorted({getattr(layer, field) for layer in self.sites.values()} - {None})
            if wanted is not None and (unknown := set(wanted) - set(recorded)):
                raise ValueError(f"no recorded layer is in {name} {sorted(unknown)}; recorded {name}s: {recorded}")
        if blocks is not None or streams is not None:
            matching = {n for n, layer in self.sites.items()
                        if (blocks is None or layer.block in set(blocks)) and (streams is None or layer.stream in set(streams))}
            layers = matching if layers is None else set(layers) & matching
        if steps is not None and not self.per_step:
            raise ValueError("selecting a step range needs the maps kept per step: record with per_step=True")
        if heads is not None and not self.heads:
            raise ValueError("selecting heads needs the maps kept per head: record with heads=True")
        wanted_layers = None if layers is None else set(layers)
        wanted_res = None if resolutions is None else set(resolutions)
        if wanted_layers is not None and (unknown := wanted_layers - set(self.layers)):
            raise ValueError(f"no recorded layer named {sorted(unknown)}; recorded layers: {sorted(self.layers)}")
        chosen = []
        for key, total in self.sums.items():
            if key.kind != kind or (wanted_res is not None and max(key.resolution) not in wanted_res):
                continue
            if wanted_layers is not None and key.layer not in wanted_layers:
                continue
            if steps is not None and not steps[0] <= key.step < steps[1]:
                continue
            if self.heads:
                total = total[:, list(heads)] if heads is not None else total
                total = total.mean(1)
            chosen.append((key, total, self.counts[key]))
        if not chosen:
            recorded = sorted({max(k.resolution) for k in self.sums if k.kind == kind})
            raise ValueError(f"nothing recorded matches that selection; {kind}-attention was recorded at resolutions {recorded}")
        return chosen
