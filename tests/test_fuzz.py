"""Odd input, drawn at random from values that broke things before: the command line's numbers and words, and job files.
Each draw ends in a clear message naming the option or value, or in a valid result; never a traceback, never an image
of garbage."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from pipelines.batch import run_batch
from pipelines.jobs import read_jobs
from pipelines.loading import load_pipeline
from ui.cli import main

NUMBERS = ["0", "-1", "1", "2", " 3", "1.5", "nan", "inf", "-inf", "1e999", "1e30", "-1e30", str(2**63), str(2**70), "abc", "",
           "0x10", "1001", "100000"]
WORDS = ["circle", "zz", "", ",", "circle,,square", "a" * 300, "red=nan", "red=1e30", "=2", "red=", "red=2", "square=-3", "\n"]
COMMANDS = {
    "generate": (["generate", "a red circle"], ["--steps", "--seed", "--guidance", "--size", "--num"]),
    "maps": (["maps", "a red circle"], ["--steps", "--seed", "--guidance", "--words"]),
    "compose": (["compose", "a red circle and a blue square", "--concepts", "circle,square"],
                ["--steps", "--seed", "--guidance", "--num", "--concepts"]),
    "edit": (["edit", "a red circle", "a red square"], ["--steps", "--seed", "--guidance", "--reweight", "--blend"]),
}
WORD_OPTIONS = ("--words", "--concepts", "--reweight", "--blend")


def draws(count: int, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        command = rng.choice(sorted(COMMANDS))
        option = rng.choice(COMMANDS[command][1])
        cases.append((command, option, rng.choice(WORDS if option in WORD_OPTIONS else NUMBERS)))
    return cases


def looks_drawn(path: str) -> bool:
    """A real picture, not the black or flat image that non-finite values leave."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    return pixels.max() > 0 and pixels.std() > 1


@pytest.mark.parametrize(("command", "option", "value"), draws(28, seed=27))
def test_command_line_values_give_a_named_error_or_a_real_image(command, option, value, tmp_path, capsys):
    argv = [*COMMANDS[command][0], "--steps", "2", option, value, "--out", str(tmp_path)]
    try:
        main(argv)
    except SystemExit as stop:
        assert stop.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"xattn {command}: error: ") and "Traceback" not in error
        assert option in error or value.strip()[:20] in error or value.partition("=")[0] in error, error
        assert len(error) < 600
        return
    written = [line for line in capsys.readouterr().out.split() if line.endswith(".png")]
    assert written and all(looks_drawn(path) for path in written)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(None)


FIELDS = {"steps": [1, 2, 0, -1, 1001, 2.5, "2", None, True], "seed": [0, 7, -1, 2**63, 2**70, 1.5, "x"],
          "guidance": [1, 5.0, 0, float("nan"), float("inf"), 1e30, "5", None], "num": [1, 2, 0, 10**9],
          "size": [64, 50, 0, 100000, -64], "prompt": ["a red circle", "", 7, ["a"], "a" * 1000],
          "words": [["circle"], ["zz"], [], "circle", [1]], "reweight": [{"red": 2}, {"red": float("nan")}, {"zz": 2}, [1]],
          "id": ["ok", "ok\n", 0, False, "", "../x", "a" * 65]}


def test_job_files_give_a_named_problem_or_a_real_result(pipe, tmp_path):
    rng = random.Random(27)
    lines = []
    for index in range(30):
        kind = rng.choice(["generate", "maps", "edit"])
        job = {"kind": kind, "steps": 2, "seed": index}
        job |= {"source": "a red circle", "target": "a red square"} if kind == "edit" else {"prompt": "a red circle"}
        for name in rng.sample(sorted(FIELDS), 2):
            if name == "prompt" and kind == "edit":
                continue
            value = rng.choice(FIELDS[name])
            job[name] = value if value is not None else job.pop(name, None)
        lines.append(json.dumps({k: v for k, v in job.items() if v is not None}, allow_nan=True))
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    listed = read_jobs(path)
    summary = run_batch(pipe, listed.jobs, tmp_path / "out", "embedded", invalid=listed.problems, progress=False)
    assert len(summary.done) + len(summary.failed) + len(summary.invalid) == len(lines)
    assert summary.done and summary.invalid
    for problem in summary.invalid:
        assert len(problem.reason) < 600 and "Traceback" not in problem.reason
    for job_id in summary.done:
        for image in (tmp_path / "out" / "jobs" / job_id).glob("*.png"):
            assert looks_drawn(image)


def test_messages_quote_long_values_by_their_ends_and_length():
    from pipelines.messages import bounded

    assert bounded("no file at " + "a" * 200 + "b" * 10) == "no file at " + "a" * 90 + "…[210 characters]…" + "a" * 20 + "b" * 10
    assert bounded("short words stay whole") == "short words stay whole"
    assert len(bounded("word " * 10_000)) < 2100


def test_a_huge_erasure_value_is_quoted_short(pipe, tmp_path, capsys):
    from pipelines.erasure import save_erasure
    from pipelines.inversion_cache import model_fingerprint

    with pytest.raises(SystemExit):
        main(["generate", "a red circle", "--steps", "1", "--erasure", "e" * 1_000_000, "--out", str(tmp_path)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert len(error) < 600 and "[1000000 characters]" in error
    name, weight = next((n, p) for n, p in pipe.unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    path = save_erasure(tmp_path / "e.safetensors", {name: weight.detach() * 0.9}, method="uce", concept="c" * 1_000_000,
                        base=model_fingerprint(pipe), settings={})
    main(["generate", "a red circle", "--steps", "1", "--erasure", str(path), "--out", str(tmp_path)])
    said = capsys.readouterr().err
    assert "erasure applied: uce of" in said and len(said) < 10_000
