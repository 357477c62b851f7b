"""Injection schedules: at which denoising steps an edit replaces the target's attention.

A window is given as a float (a fraction of the steps from the start: 0.8 is the first 80 %),
an int (that many steps from the start), or a (start, end) pair of either kind; floats are
always fractions and ints always step counts. A fraction f of n steps is step int(f * n), or
int(f * span) over a longer span (google/prompt-to-prompt counts cross-attention windows over
n + 1 rows: `editors.conventions`), never past the last step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import torch

Bound = Union[int, float]
Window = Union[Bound, tuple[Bound, Bound]]


def _bound(value: Bound, steps: int, what: str, span: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what}: a schedule bound is an int (steps) or a float (fraction of steps), not {value!r}")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{what}: the fraction {value} is outside [0, 1]; give an int for a number of steps")
        return min(int(value * span), steps)
    if not 0 <= value <= steps:
        raise ValueError(f"{what}: step {value} is outside 0..{steps} for a {steps}-step run")
    return value


def window(spec: Window, steps: int, what: str = "schedule", span: int | None = None) -> tuple[int, int]:
    """The half-open step range [start, end) a window spec covers in a run of `steps` steps (fractions of `span`, default `steps`)."""
    span = steps if span is None else span
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        if len(spec) != 2:
            raise ValueError(f"{what}: a window is (start, end); got {spec!r}")
        start, end = _bound(spec[0], steps, what, span), _bound(spec[1], steps, what, span)
        if start > end:
            raise ValueError(f"{what}: the window {spec!r} starts after it ends")
        return start, end
    return 0, _bound(spec, steps, what, span)


def word_windows(
    spec: Window | Mapping[str, Window], steps: int, what: str = "cross-attention schedule", span: int | None = None
) -> tuple[tuple[int, int], dict[str, tuple[int, int]]]:
    """A default window and per-word windows from a spec that is a window or a {word: window} dict.

    In a dict, the key "default" sets the window of the words not named (else all steps).
    """
    if not isinstance(spec, Mapping):
        return window(spec, steps, what, span), {}
    default = window(spec.get("default", (0, steps)), steps, f"{what}, default", span)
    return default, {word: window(value, steps, f"{what}, word {word!r}", span) for word, value in spec.items() if word != "default"}


def token_schedule(default: tuple[int, int], words: Mapping[tuple[int, ...], tuple[int, int]], steps: int, tokens: int) -> torch.Tensor:
    """(steps, tokens) of 1 where a token's attention is injected at a step and 0 elsewhere.

    `words` maps a word's token indices to its own window; every other token follows `default`.
    """
    table = torch.zeros(steps, tokens)
    table[default[0] : default[1]] = 1.0
    for indices, (start, end) in words.items():
        table[:, list(indices)] = 0.0
        table[start:end, list(indices)] = 1.0
    return table
