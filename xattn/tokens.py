"""Words to token indices: which columns of a cross-attention map belong to a word of the prompt.

Lookup is by word, never by token index: case-insensitive, punctuation-aware (a word is a run
of letters and digits, so "cat's" holds the words "cat" and "s"), a word that the tokenizer
splits into several tokens maps to all of them, a phrase ("red circle") to all tokens of its
words, and a repeated word to each occurrence or to the one asked for. Index 0 is the
start-of-text token, as in the encoder's output and the attention maps. A sentencepiece tokenizer's
(T5's) pieces carry their spaces as "▁", which the offsets leave out, so its words are found alike. A
pipeline whose denoiser reads several text streams (SD3: CLIP, then T5) has a word at all its positions.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from xattn.families import text_streams

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


def _lookup(words: list[Word], prompt: str, word: str, occurrence: int | None, limit: str) -> list[int]:
    """Token indices of `word` (a word or phrase) among `words` of `prompt`: every occurrence, or the `occurrence`-th."""
    wanted = [_normal(w) for w in WORD.findall(word)]
    if not wanted:
        raise ValueError(f"{word!r} holds no word to look up (letters or digits)")
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
        raise ValueError(f"{word!r} lies beyond the {limit} in {prompt!r}; shorten the prompt")
    return tokens


def word_tokens(tokenizer, prompt: str, word: str, occurrence: int | None = None) -> list[int]:
    """Token indices of `word` (a word or phrase) in `prompt`: every occurrence, or the `occurrence`-th (0-based).

    Raises ValueError naming the prompt's words when the word is not there, when the occurrence
    does not exist, or when the word lies beyond the tokenizer's length limit.
    """
    return _lookup(prompt_words(tokenizer, prompt), prompt, word, occurrence, f"tokenizer's {tokenizer.model_max_length}-token limit")


def pipeline_tokenizers(pipe) -> list:
    """The tokenizers whose positions index the pipeline's attention maps, first the one that names them."""
    found = [t for stream in text_streams(pipe) for t in stream.tokenizers]
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no tokenizer, so xattn cannot find a prompt's words in its attention")
    return found


def pipeline_tokenizer(pipe):
    """The tokenizer whose token positions index the pipeline's cross-attention maps (on SD3, its CLIP positions)."""
    return pipeline_tokenizers(pipe)[0]


def _stream_words(stream, prompt: str) -> list[Word]:
    first, *others = stream.tokenizers
    words = prompt_words(first, prompt)
    for other in others:
        for mine, theirs in zip(words, prompt_words(other, prompt)):
            if mine.tokens != theirs.tokens:
                raise ValueError(f"the pipeline's tokenizers place {mine.text!r} at different tokens ({list(mine.tokens)} vs "
                                 f"{list(theirs.tokens)}); its maps would disagree")
    return [Word(w.text, w.start, w.end, tuple(t + stream.offset for t in w.tokens)) for w in words]


def pipeline_words(pipe, prompt: str) -> list[Word]:
    """The prompt's words with their positions among the text tokens of the pipeline's attention: in every text stream
    the denoiser reads (SD3: CLIP's 77 positions, then T5's), so a word's map covers all the tokens that carry it."""
    streams = text_streams(pipe)
    if not streams:
        raise ValueError(f"{type(pipe).__name__} has no tokenizer, so xattn cannot find a prompt's words in its attention")
    merged = _stream_words(streams[0], prompt)
    for stream in streams[1:]:
        merged = [Word(a.text, a.start, a.end, a.tokens + b.tokens) for a, b in zip(merged, _stream_words(stream, prompt))]
    return merged


def pipeline_word_tokens(pipe, prompt: str, word: str, occurrence: int | None = None) -> list[int]:
    """Positions of a word among the text tokens of the pipeline's attention, in every stream that carries it."""
    limits = " and ".join(f"{s.tokenizers[0].model_max_length}-token" for s in text_streams(pipe))
    return _lookup(pipeline_words(pipe, prompt), prompt, word, occurrence, f"text encoders' {limits} limit")
