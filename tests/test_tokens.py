import pytest
from transformers import CLIPTokenizer

from shapes import MODEL_PATH
from tests.architectures import sdxl
from xattn.tokens import pipeline_word_tokens, prompt_words, word_tokens

TOKENIZER = CLIPTokenizer.from_pretrained(MODEL_PATH / "tokenizer")
PROMPT = "A Red-Circle, and a cat's hat; a red square. Naïve red"

# prompt, word, occurrence, expected token indices (0 is <|startoftext|>)
HARD_CASES = [
    ("a red circle", "red", None, [2]),
    ("a red circle", "RED", None, [2]),  # case-insensitive
    ("A Red-Circle, and a cat", "circle", None, [4]),  # hyphen and comma are not part of the word
    ("a cat's hat", "cat", None, [2]),  # the possessive is its own word
    ("a cat's hat", "cat's", None, [2, 3]),
    ("a naïve cat", "naïve", None, [2, 3, 4]),  # one word, three tokens
    ("a bicycle", "bicycle", None, [2]),
    ("a red circle and a red square", "red", None, [2, 6]),  # every occurrence
    ("a red circle and a red square", "red", 1, [6]),  # the second one
    ("a red circle and a red square", "red", -1, [6]),
    ("a red circle and a red square", "red square", None, [6, 7]),  # a phrase
    ("a red circle and a red square", "red circle", None, [2, 3]),
    ("a blue square!!!", "square", None, [3]),
]


@pytest.mark.parametrize("prompt, word, occurrence, expected", HARD_CASES)
def test_word_lookup_hard_cases(prompt, word, occurrence, expected):
    assert word_tokens(TOKENIZER, prompt, word, occurrence) == expected


def test_prompt_words_carry_their_tokens():
    words = prompt_words(TOKENIZER, PROMPT)
    assert [w.text for w in words] == ["A", "Red", "Circle", "and", "a", "cat", "s", "hat", "a", "red", "square", "Naïve", "red"]
    assert words[11].tokens == (16, 17, 18)


@pytest.mark.parametrize(
    "word, occurrence, message",
    [("dog", None, "'dog' is not a word of the prompt .* its words are: A, Red, Circle"),
     ("red", 3, "occurs 3 time"), ("...", None, "holds no word")],
)
def test_lookup_errors_name_the_problem(word, occurrence, message):
    with pytest.raises(ValueError, match=message):
        word_tokens(TOKENIZER, PROMPT, word, occurrence)


def test_words_past_the_token_limit_are_an_error():
    prompt = " ".join(["a red circle"] * 30) + " blue"
    with pytest.raises(ValueError, match="beyond the tokenizer's 77-token limit"):
        word_tokens(TOKENIZER, prompt, "blue")


def test_sdxl_uses_both_tokenizers():
    pipe = sdxl()
    assert pipeline_word_tokens(pipe, "a red circle", "circle") == [3]
