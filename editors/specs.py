"""What a user asks for: edits described by words, resolved against the prompts and tokenizer at run time."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from editors.conventions import XATTN, Conventions
from editors.edits import CrossEdit, refine, reweight, swap
from xattn.align import refine_mapper, segments, swap_mapper
from xattn.families import text_streams
from xattn.tokens import word_tokens

MAX_WEIGHT = 10.0  # a larger factor saturates the softmax: the image turns to garbage


@dataclass(frozen=True)
class Swap:
    """Word swap: the prompts have the same words but for the swapped ones."""

    def build(self, tokenizer, source: str, target: str, conventions: Conventions = XATTN) -> CrossEdit:
        return swap(swap_mapper(tokenizer, source, target))


@dataclass(frozen=True)
class Refine:
    """Refinement: the target adds words; the tokens it shares with the source take the source's attention."""

    def build(self, tokenizer, source: str, target: str, conventions: Conventions = XATTN) -> CrossEdit:
        return refine(*refine_mapper(tokenizer, source, target, by_position=conventions.refine_tail == "by position"))


@dataclass(frozen=True)
class Reweight:
    """Scale the attention of words of the target prompt, each by its own factor, on top of `base`.

    Factors are not renormalised (as in the paper): above 1 strengthens a word, below 1 weakens
    it, negative values push away from it.
    """

    weights: Mapping[str, float]
    base: Swap | Refine | None = field(default=None)

    def __post_init__(self) -> None:
        for word, factor in self.weights.items():
            if not (isinstance(factor, (int, float)) and math.isfinite(factor) and abs(factor) <= MAX_WEIGHT):
                raise ValueError(f"--reweight {word}={factor}: a word's scale must be a number between -{MAX_WEIGHT:g} and "
                                 f"{MAX_WEIGHT:g} (1 leaves it as it is, 2 doubles its attention)")

    def build(self, tokenizer, source: str, target: str, conventions: Conventions = XATTN) -> CrossEdit:
        scale = torch.ones(tokenizer.model_max_length)
        for word, factor in self.weights.items():
            scale[word_tokens(tokenizer, target, word)] = float(factor)
        return reweight(scale, None if self.base is None else self.base.build(tokenizer, source, target, conventions))


def pipeline_edit(pipe, spec: Swap | Refine | Reweight, source: str, target: str, conventions: Conventions = XATTN) -> CrossEdit:
    """The edit over the text tokens of the pipeline's attention: each text stream's (SD3: its CLIP positions, then
    T5's) built with that stream's tokenizer and placed at the stream's offset."""
    parts = [(stream.offset, spec.build(stream.tokenizers[0], source, target, conventions)) for stream in text_streams(pipe)]
    size = max(offset + part.own.shape[0] for offset, part in parts)
    mapper, own = torch.eye(size), torch.zeros(size)
    for offset, part in parts:
        end = offset + part.own.shape[0]
        mapper[offset:end, offset:end], own[offset:end] = part.source, part.own
    return CrossEdit(mapper, own)


def auto_edit(tokenizer, source: str, target: str) -> Swap | Refine:
    """Swap when the prompts have as many words, refinement when the target only adds words."""
    src, tgt = segments(tokenizer, source).words, segments(tokenizer, target).words
    if len(src) == len(tgt):
        return Swap()
    if _is_subsequence([w.casefold() for w in src], [w.casefold() for w in tgt]):
        return Refine()
    raise ValueError(
        f"cannot choose an edit for {source!r} -> {target!r}: a swap needs as many words in both prompts and a "
        "refinement needs the target to keep every source word in order and add words; choose a mode explicitly"
    )


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    remaining = iter(long)
    return all(word in remaining for word in short)
