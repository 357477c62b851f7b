"""How fast hostile files are refused: the YAML alias bomb of issue 27 and a decompression-bomb PNG.

    python -m benchmarks.hostile_input [--out benchmarks/results/hostile_input.json]

Each is read 5 times; the median time and the message are reported.
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
import zlib
from pathlib import Path

from benchmarks.harness import write_json
from pipelines.images import read_image
from pipelines.jobs import read_jobs


def alias_bomb_words() -> str:
    """A YAML `words:` block of nine levels of nine aliases: 9^9 strings once expanded."""
    levels = ["a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']"]
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
    return "  words:\n" + "".join(f"    - {{{level}}}\n" for level in levels)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims (width, height) and holds no pixel data: what a decompression bomb shows before it unpacks."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def timed(read) -> dict:
    times, message = [], ""
    for _ in range(5):
        began = time.perf_counter()
        message = read()
        times.append(time.perf_counter() - began)
    return {"median_ms": sorted(times)[2] * 1000, "message": message}


def _refusal(path: Path) -> str:
    try:
        read_image(path)
    except ValueError as error:
        return str(error)
    return "read"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hostile_input.json"))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    yaml_path, png_path = folder / "bomb.yaml", folder / "bomb.png"
    yaml_path.write_text("- kind: maps\n  prompt: a red circle\n" + alias_bomb_words())
    png_path.write_bytes(png_header(100_000, 100_000))
    results = {"yaml_alias_bomb": timed(lambda: "; ".join(str(p) for p in read_jobs(yaml_path).problems)),
               "png_decompression_bomb": timed(lambda: _refusal(png_path))}
    print(results)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
