"""The README's commands and Python snippets, verbatim and in order, run from a fresh folder as a newcomer runs them."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from shapes.judge import read_objects

README = Path(__file__).parents[1] / "README.md"
# Commands a test cannot run here, and where each is tested instead.
ELSEWHERE = {
    ("make", "demo"): "it installs, then runs xattn demo: tests/test_cli.py::test_demo_writes_images_and_an_index",
    ("make", "test"): "CI runs it on a fresh clone (.ci/run)",
    ("xattn", "ui"): "it serves until stopped: tests/test_ui.py starts it and calls every endpoint",
    ("xattn", "demo"): "tests/test_cli.py::test_demo_writes_images_and_an_index",
}


def check_default_erasure(run: subprocess.CompletedProcess, folder: Path) -> None:
    """Issue 29's bar for the erasure a newcomer types first: circles in at most 1 of 6 images, blue squares in 5 of 6."""
    circles = re.search(r"'circle' still drawn in (\d)/6 images of 'a red circle'", run.stdout)
    squares = re.search(r"'a blue square' drawn exactly in (\d)/6", run.stdout)
    assert circles and int(circles[1]) <= 1 and squares and int(squares[1]) >= 5, run.stdout


def check_erased_generation(run: subprocess.CompletedProcess, folder: Path) -> None:
    (png,) = run.stdout.split()
    assert "erasure applied: uce of 'circle'" in run.stderr
    assert "circle" not in [o.shape for o in read_objects(np.asarray(Image.open(folder / png).convert("RGB")))]


# What a command's output must show beyond its exit status.
CHECKS = {
    ("xattn", "unlearn", "--concept", "circle", "--out", "erased/"): check_default_erasure,
    ("xattn", "generate", "a red circle", "--erasure", "erased/erase-circle-uce.safetensors"): check_erased_generation,
}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)


def commands() -> list[list[str]]:
    lines = [shlex.split(line, comments=True) for block in blocks("bash") for line in block.splitlines()]
    return [words for words in lines if words]


def test_every_readme_command_is_run_or_tested_elsewhere():
    listed = [tuple(words[:2]) for words in commands()]
    assert set(ELSEWHERE) <= set(listed) and sum(w[0] == "xattn" for w in listed) >= 15
    assert set(CHECKS) <= {tuple(words) for words in commands()}


def test_the_readme_runs_in_order_from_a_fresh_folder(tmp_path):
    (tmp_path / "jobs.jsonl").write_text(blocks("json")[0])  # "jobs.jsonl: the lines under Batch runs"
    env = os.environ | {"XATTN_CACHE": str(tmp_path / "cache")}
    for words in commands():
        if tuple(words[:2]) in ELSEWHERE:
            continue
        assert words[0] == "xattn", words
        run = subprocess.run([sys.executable, "-m", "ui.cli", *words[1:]], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert run.returncode == 0, f"{shlex.join(words)}\n{run.stdout}\n{run.stderr}"
        if tuple(words) in CHECKS:
            CHECKS[tuple(words)](run, tmp_path)
    script = "\n".join(blocks("python"))
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
