"""Words to token indices: which columns of a cross-attention map belong to a word of the prompt.

Lookup is by word, never by token index: case-insensitive, punctuation-aware (a word is a run
of letters and digits, so "cat's" holds the words "cat" and "s"), a word that the tokenizer
splits into several tokens maps to all of them, a phrase ("red circle") to all tokens of its
words, and a repeated word to each occurrence or to the one asked for. Index 0 is the
start-of-text token, as in the encoder's output and the attention maps.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class Word:
    text: str
    start: int
    end: int
    tokens: tuple[int, ...]


def _normal(text: str) -> str:
    return unicodedata.normalize("NFC", text).casefold()


def prompt_words(tokenizer, prompt: str) -> list[Word]:
    """The prompt's words in order, each with the token indices it covers (empty when truncated away)."""
    encoding = tokenizer(prompt, return_offsets_mapping=True, truncation=True, max_length=tokenizer.model_max_length)
    spans = encoding["offset_mapping"]
    words = []
    for match in WORD.finditer(prompt):
        start, end = match.span()
        tokens = tuple(i for i, (a, b) in enumerate(spans) if b > a and a < end and b > start)
        words.append(Word(match.group(), start, end, tokens))
    return words


def word_tokens(tokenizer, prompt: str, word: str, occurrence: int | None = None) -> list[int]:
    """Token indices of `word` (a word or phrase) in `prompt`: every occurrence, or the `occurrence`-th (0-based).

    Raises ValueError naming the prompt's words when the word is not there, when the occurrence
    does not exist, or when the word lies beyond the tokenizer's length limit.
    """
    wanted = [_normal(w) for w in WORD.findall(word)]
    if not wanted:
        raise ValueError(f"{word!r} holds no word to look up (letters or digits)")
    words = prompt_words(tokenizer, prompt)
    normal = [_normal(w.text) for w in words]
    hits = [i for i in range(len(words) - len(wanted) + 1) if normal[i : i + len(wanted)] == wanted]
    if not hits:
        listing = ", ".join(dict.fromkeys(w.text for w in words)) or "(none)"
        raise ValueError(f"{word!r} is not a word of the prompt {prompt!r}; its words are: {listing}")
    if occurrence is not None:
        if not -len(hits) <= occurrence < len(hits):
            raise ValueError(f"{word!r} occurs {len(hits)} time(s) in {prompt!r}; occurrence {occurrence} does not exist")
        hits = [hits[occurrence]]
    tokens = sorted({t for i in hits for w in words[i : i + len(wanted)] for t in w.tokens})
    if not tokens or any(not w.tokens for i in hits for w in words[i : i + len(wanted)]):
        raise ValueError(
            f"{word!r} lies beyond the tokenizer's {tokenizer.model_max_length}-token limit in {prompt!r}; shorten the prompt"
        )
    return tokens


def pipeline_tokenizers(pipe) -> list:
    """The pipeline's tokenizers, first the one whose positions the maps are indexed by (SDXL's refiner has only tokenizer_2)."""
    found = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no tokenizer, so xattn cannot find a prompt's words in its attention")
    return found


def pipeline_tokenizer(pipe):
    """The tokenizer whose token positions index the pipeline's cross-attention maps."""
    return pipeline_tokenizers(pipe)[0]


def pipeline_word_tokens(pipe, prompt: str, word: str, occurrence: int | None = None) -> list[int]:
    """Token indices of a word for a pipeline; with two text encoders (SDXL) both must agree."""
    first, *others = pipeline_tokenizers(pipe)
    tokens = word_tokens(first, prompt, word, occurrence)
    for other in others:
        found = word_tokens(other, prompt, word, occurrence)
        if found != tokens:
            raise ValueError(f"the two tokenizers place {word!r} at different tokens ({tokens} vs {found}); maps would disagree")
    return tokens
