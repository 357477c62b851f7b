import json
import subprocess
import sys

import pytest
from transformers import CLIPTokenizer

from shapes import COLOURS, MODEL_PATH, SHAPES
from shapes.tokenizer import CHECK_IDS, CHECK_PROMPT, build_tokenizer, bytes_to_unicode, read_bpe_from_wheel, vocab_and_merges

SHIPPED = CLIPTokenizer.from_pretrained(MODEL_PATH / "tokenizer")


def test_shipped_tokenizer_gives_clips_ids():
    assert SHIPPED(CHECK_PROMPT).input_ids == CHECK_IDS
    assert SHIPPED("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(SHIPPED) == 49408 and SHIPPED.model_max_length == 77
    padded = SHIPPED("a red circle", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_every_word_of_the_world_is_one_token():
    for word in [*COLOURS, *SHAPES, "left", "right", "top", "bottom", "above", "below"]:
        assert len(SHIPPED(word).input_ids) == 3, word


def test_byte_map_is_a_bijection_onto_printable_characters():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in table.values())


def test_vocabulary_layout_from_a_tiny_merges_file():
    vocab, merges = vocab_and_merges("#version: 0.2\na b\nab c</w>\n")
    assert merges[:2] == [("a", "b"), ("ab", "c</w>")]
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["ab"] == 512 and vocab["abc</w>"] == 513
    assert list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "open_clip_torch", "-d", str(folder)],
        capture_output=True, text=True,
    )
    wheels = list(folder.glob("open_clip_torch-*.whl"))
    if result.returncode or not wheels:
        pytest.skip(f"the open_clip_torch wheel could not be downloaded: {result.stderr.strip()[-200:]}")
    return wheels[0]


def test_building_from_the_wheel_reproduces_the_shipped_tokenizer(wheel):
    built = build_tokenizer(read_bpe_from_wheel(wheel))
    assert built.get_vocab() == SHIPPED.get_vocab()
    shipped_merges = json.loads((MODEL_PATH / "tokenizer" / "tokenizer.json").read_text())["model"]["merges"]
    assert json.loads(built.backend_tokenizer.to_str())["model"]["merges"] == shipped_merges
