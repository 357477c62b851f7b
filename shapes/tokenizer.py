"""Build the real CLIP BPE tokenizer offline from the BPE merges file in the `open_clip_torch` wheel.

No package here ships CLIP's vocabulary and no hub is reachable, but the wheel carries the merges
that define it. The vocabulary is the 256 byte-level characters, the same with `</w>`, the 48,894
merges joined, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407), as in OpenAI's CLIP.

    python -m shapes.tokenizer OUT_DIR [--wheel open_clip_torch-*.whl]

Without --wheel the wheel is fetched with `pip download --no-deps open_clip_torch`; open_clip is
never imported.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from transformers import CLIPTokenizer

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
MERGE_COUNT = 49152 - 256 - 2
CHECK_PROMPT = "a photo of a cat riding a bicycle"
CHECK_IDS = [49406, 320, 1125, 539, 320, 2368, 6765, 320, 11652, 49407]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def vocab_and_merges(bpe_text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's token-to-id vocabulary and ordered merges from the text of the BPE file."""
    lines = bpe_text.split("\n")[1 : MERGE_COUNT + 1]
    merges = [tuple(line.split()) for line in lines]
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def read_bpe_from_wheel(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        return gzip.decompress(zf.read(BPE_MEMBER)).decode("utf-8")


def download_wheel(folder: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "open_clip_torch", "-d", str(folder)],
        check=True,
    )
    wheels = sorted(folder.glob("open_clip_torch-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download put no open_clip_torch wheel in {folder}")
    return wheels[-1]


def build_tokenizer(bpe_text: str, max_length: int = 77) -> CLIPTokenizer:
    """A transformers CLIPTokenizer with CLIP's exact ids; checked against a known prompt."""
    vocab, merges = vocab_and_merges(bpe_text)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)
    ids = tokenizer(CHECK_PROMPT).input_ids
    if ids != CHECK_IDS:
        raise RuntimeError(f"built tokenizer gives {ids} for {CHECK_PROMPT!r}; CLIP gives {CHECK_IDS}")
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write the tokenizer to (e.g. MODEL/tokenizer)")
    parser.add_argument("--wheel", type=Path, help="an open_clip_torch wheel; downloaded when absent")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        tokenizer = build_tokenizer(read_bpe_from_wheel(wheel))
    tokenizer.save_pretrained(args.out)
    print(f"wrote the CLIP tokenizer ({len(tokenizer)} tokens) to {args.out}")


if __name__ == "__main__":
    main()
