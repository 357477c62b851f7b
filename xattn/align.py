"""Token alignment between two prompts: which source tokens a target token's attention comes from.

Two alignments, as Prompt-to-Prompt uses them:
- `swap_mapper`: prompts with the same words except some swapped ("a red circle" -> "a blue
  circle"). A (tokens, tokens) matrix M with new_map = old_map @ M; a swapped word that splits
  into a different number of tokens shares its mass evenly, so a column block still sums to the
  source word's mass.
- `refine_mapper`: the target adds words ("a circle" -> "a red circle"). A global alignment of
  the two token sequences; each target token gets its source index, or -1 when it is new.

Both continue past the end of the text: the end-of-text token and the padding after it map to
their counterparts, counted from each prompt's own end. (google/prompt-to-prompt maps a
refinement's padding by absolute position, which shifts it whenever the prompts differ in
length; `refine_mapper(..., by_position=True)` does so too.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xattn.tokens import prompt_words


@dataclass(frozen=True)
class Segments:
    """A prompt's text tokens (after start-of-text) grouped into words and the gaps between them.

    gaps[k] holds the tokens before word k that belong to no word (punctuation); gaps[-1] the
    ones after the last word. `end` is the index of the end-of-text token.
    """

    words: tuple[str, ...]
    word_tokens: tuple[tuple[int, ...], ...]
    gaps: tuple[tuple[int, ...], ...]
    end: int


def _token_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids with start- and end-of-text; a prompt the length limit would cut is an error."""
    ids = tokenizer(prompt, truncation=False).input_ids
    if len(ids) > tokenizer.model_max_length:
        raise ValueError(f"the prompt {prompt!r} is {len(ids)} tokens long; the tokenizer keeps {tokenizer.model_max_length}: shorten it")
    return ids


def _tail(source_end: int, target_end: int, size: int) -> list[tuple[int, int]]:
    """(source, target) token pairs from `target_end` on, each counted from its own prompt's end."""
    return [(min(source_end + t - target_end, size - 1), t) for t in range(target_end, size)]


def segments(tokenizer, prompt: str) -> Segments:
    """Split the tokens of `prompt` into words and gaps; a prompt cut by the length limit is an error."""
    ids = _token_ids(tokenizer, prompt)
    words = [w for w in prompt_words(tokenizer, prompt) if w.tokens]
    owned = {t for w in words for t in w.tokens}
    gaps: list[list[int]] = [[] for _ in range(len(words) + 1)]
    for token in range(1, len(ids) - 1):
        if token not in owned:
            gaps[sum(1 for w in words if w.tokens[0] < token)].append(token)
    return Segments(tuple(w.text for w in words), tuple(w.tokens for w in words), tuple(map(tuple, gaps)), len(ids) - 1)


def _map_block(mapper: torch.Tensor, source: tuple[int, ...], target: tuple[int, ...]) -> None:
    if len(source) == len(target):
        for s, t in zip(source, target):
            mapper[s, t] = 1.0
    elif source and target:
        for t in target:
            mapper[list(source), t] = 1.0 / len(target)


def swap_mapper(tokenizer, source: str, target: str) -> torch.Tensor:
    """The (tokens, tokens) word-swap matrix M: the target's map is the source's map @ M.

    The prompts must have the same number of words; words that differ (case aside) are swapped.
    A swapped word of n source and m target tokens gives each target token 1/m of every source
    token of the word.
    """
    src, tgt = segments(tokenizer, source), segments(tokenizer, target)
    if len(src.words) != len(tgt.words):
        raise ValueError(
            f"a word swap needs prompts with the same number of words; {source!r} has {len(src.words)} and "
            f"{target!r} has {len(tgt.words)}. To add or remove words, use refinement (mode 'refine')"
        )
    size = tokenizer.model_max_length
    mapper = torch.zeros(size, size)
    mapper[0, 0] = 1.0
    for s, t in zip(src.word_tokens, tgt.word_tokens):
        _map_block(mapper, s, t)
    for s, t in zip(src.gaps, tgt.gaps):
        _map_block(mapper, s, t)
    for s, t in _tail(src.end, tgt.end, size):
        mapper[s, t] = 1.0
    return mapper


def swapped_words(tokenizer, source: str, target: str) -> list[tuple[str, str]]:
    """The (source word, target word) pairs a swap changes."""
    src, tgt = segments(tokenizer, source), segments(tokenizer, target)
    return [(a, b) for a, b in zip(src.words, tgt.words) if a.casefold() != b.casefold()]


def align(source_ids: list[int], target_ids: list[int]) -> list[int]:
    """Global alignment (Needleman-Wunsch: match 1, mismatch -1, gap 0) of two token id sequences.

    Returns, for every target position, the aligned source position or -1 for an inserted token.
    Ties prefer an insertion, then a deletion, then a (mis)match, as google/prompt-to-prompt's
    aligner does, so repeated tokens align the same way.
    """
    n, m = len(source_ids), len(target_ids)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        move[i][0] = 2
    for j in range(1, m + 1):
        move[0][j] = 1
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if source_ids[i - 1] == target_ids[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if best == left else 2 if best == up else 3
    result = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        step = move[i][j]
        if step == 1:
            j -= 1
        elif step == 2:
            i -= 1
        else:
            i, j = i - 1, j - 1
            if source_ids[i] == target_ids[j]:
                result[j] = i
    return result


def refine_mapper(tokenizer, source: str, target: str, by_position: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, kept) over the target's tokens: index[t] is the source token aligned with t (0 where
    none), kept[t] is 1 where there is one and 0 for tokens the target adds.

    Mismatched tokens count as new: a refinement adds words, it does not swap them. The padding
    after the end-of-text token maps from each prompt's end, or `by_position` (google's).
    """
    limit = tokenizer.model_max_length
    source_ids, target_ids = _token_ids(tokenizer, source), _token_ids(tokenizer, target)
    aligned = align(source_ids, target_ids)
    index = torch.zeros(limit, dtype=torch.long)
    kept = torch.zeros(limit)
    for t, s in enumerate(aligned):
        if s >= 0:
            index[t], kept[t] = s, 1.0
    for s, t in _tail(len(source_ids), len(target_ids), limit):
        index[t], kept[t] = (t if by_position else s), 1.0
    return index, kept
