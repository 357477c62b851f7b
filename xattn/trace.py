"""`trace`: per-word attention heat maps around an ordinary pipeline call.

    with xattn.trace(pipe) as tc:
        image = pipe(["a red circle", "a blue square"]).images
    maps = tc.word_maps(image=1)             # {"a": array, "blue": array, "square": array}
    tc.word_maps(["red"], image=0, resolutions=[16], normalise="sum")

Maps exist for every image of the batch (all prompts, all images per prompt), at image size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from xattn.attach import CallState, attach
from xattn import heatmap
from xattn.concept_maps import ConceptStream, chosen_blocks, concept_embeddings
from xattn.store import AttentionStore
from xattn.tokens import pipeline_word_tokens, pipeline_words


class Trace:
    def __init__(self, pipe, store: AttentionStore, state: CallState, concepts: list[str] | None = None) -> None:
        self.pipe, self.store, self.state, self.concepts = pipe, store, state, concepts or []

    @property
    def prompts(self) -> list[str | None]:
        """The prompt of each image of the traced call, in batch order (None where it was given as embeddings)."""
        layout = self.state.layout
        return [layout.prompt_of_row(r) for r in range(layout.conditional_rows)]

    def image_size(self) -> tuple[int, int]:
        factor = getattr(self.pipe, "vae_scale_factor", 1)
        return self.state.latent[0] * factor, self.state.latent[1] * factor

    def token_maps(
        self,
        image: int = 0,
        resolutions: Iterable[int] | None = None,
        layers: Iterable[str] | None = None,
        steps: tuple[int, int] | None = None,
        heads: Iterable[int] | None = None,
        kind: str = "cross",
        blocks: Iterable[int] | None = None,
        streams: Iterable[str] | None = None,
    ) -> torch.Tensor:
        """Mean attention map of every token for one image, (keys, H, W) at image size; the selection is the store's
        (`AttentionStore.select`)."""
        if not self.store.sums:
            raise ValueError("nothing was recorded: call the pipeline inside the `with xattn.trace(pipe)` block")
        count = len(self.prompts)
        if not -count <= image < count:
            raise ValueError(f"image {image} does not exist; the traced call made {count} image(s)")
        row = image % count
        selected = self.store.select(kind, resolutions, layers, steps, heads, blocks, streams)
        return heatmap.aggregate([(key, sums[row : row + 1], n) for key, sums, n in selected], self.image_size())[0]

    def concept_maps(self, image: int = 0, normalise: str = "minmax", **select) -> dict[str, np.ndarray]:
        """One (H, W) ConceptAttention map per traced concept for one image (softmax over the concepts at each token,
        before `normalise`)."""
        if not self.concepts:
            raise ValueError("no concepts were traced: trace(pipe, concepts=['circle', 'background', ...])")
        maps = self.token_maps(image, kind="concept", **select)
        return {name: heatmap.normalise(maps[i], normalise).numpy() for i, name in enumerate(self.concepts)}

    def word_maps(
        self,
        words: Iterable[str] | None = None,
        image: int = 0,
        normalise: str = "minmax",
        prompt: str | None = None,
        **select,
    ) -> dict[str, np.ndarray]:
        """One (H, W) map per word of that image's prompt (all words when none are named).

        A word made of several tokens gets the mean of their maps; with all words, a repeated
        word appears once per occurrence, the later ones labelled "word#2", "word#3". `prompt`
        names the text of an image the pipeline was given as `prompt_embeds`.
        """
        maps = self.token_maps(image, **select)
        prompt = prompt or self.prompts[image]
        if prompt is None:
            raise ValueError(
                f"image {image} was made from prompt_embeds, so its words are unknown: pass the text they encode, "
                "word_maps(prompt='...'), or read token_maps(image) by token index"
            )
        spoken = [w for w in pipeline_words(self.pipe, prompt) if w.tokens]
        if words is None:
            seen: dict[str, int] = {}
            chosen = []
            for word in spoken:
                seen[word.text.lower()] = seen.get(word.text.lower(), 0) + 1
                label = word.text if seen[word.text.lower()] == 1 else f"{word.text}#{seen[word.text.lower()]}"
                chosen.append((label, list(word.tokens)))
        else:
            chosen = [(w, pipeline_word_tokens(self.pipe, prompt, w)) for w in words]
        read = maps.shape[0]  # a stream's tokens past what the pipeline encoded (its max_sequence_length) were never seen
        chosen = [(label, [t for t in tokens if t < read]) for label, tokens in chosen]
        beyond = [label for label, tokens in chosen if not tokens]
        if beyond:
            raise ValueError(f"{', '.join(map(repr, beyond))} lies beyond the {read} text tokens the model read; shorten the prompt")
        if normalise == "tokens":
            shares = heatmap.normalise(maps, "tokens", sorted({t for w in spoken for t in w.tokens if t < read}))
            return {label: shares[tokens].mean(0).numpy() for label, tokens in chosen}
        return {label: heatmap.normalise(maps[tokens].mean(0), normalise).numpy() for label, tokens in chosen}


@contextmanager
def trace(pipe, concepts: Sequence[str] | None = None, concept_blocks: Sequence[int] | None = None, **store_options) -> Iterator[Trace]:
    """Record attention during the pipeline calls inside the block; options go to AttentionStore.

    `concepts` (SD3, Flux) also traces ConceptAttention maps of these words (`Trace.concept_maps`), at the
    double-stream blocks `concept_blocks` (default: the last four).
    """
    store = AttentionStore(**store_options)
    if concepts:
        store.concepts = ConceptStream(concept_embeddings(pipe, concepts), concepts, chosen_blocks(pipe, concept_blocks))
    with attach(pipe, store) as state, (store.concepts.installed(pipe, store, state) if concepts else nullcontext()):
        yield Trace(pipe, store, state, list(concepts or []))
