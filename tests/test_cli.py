import subprocess
import sys

import numpy as np
from PIL import Image


def xattn(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ui.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_generate_writes_pngs_with_their_settings(tmp_path):
    result = xattn("generate", "a green triangle on the left", "--seed", "5", "--steps", "3", "--num", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a-green-triangle-on-the-left-seed5.png", "a-green-triangle-on-the-left-seed6.png"]
    image = Image.open(paths[1])
    assert image.size == (64, 64)
    assert image.text == {"prompt": "a green triangle on the left", "seed": "6", "steps": "3", "guidance": "5.0", "model": "embedded"}
    assert "it/s" in result.stderr or "s/it" in result.stderr  # the progress bar


def test_generate_rejects_a_missing_model_and_a_bad_size(tmp_path):
    missing = xattn("generate", "a red circle", "--model", str(tmp_path / "nope"), "--out", str(tmp_path))
    assert missing.returncode == 2 and "no model folder at" in missing.stderr and "Traceback" not in missing.stderr
    size = xattn("generate", "a red circle", "--size", "50", "--steps", "1", "--out", str(tmp_path))
    assert size.returncode == 2 and "multiple of 16" in size.stderr


def test_demo_writes_images_and_an_index(tmp_path):
    result = xattn("demo", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    index = (tmp_path / "index.html").read_text()
    generated = sorted((tmp_path / "generate").glob("*.png"))
    assert len(generated) == 4
    for png in [*generated, tmp_path / "maps" / "grid.png"]:
        assert png.exists() and png.relative_to(tmp_path).as_posix() in index
    assert index.count("judge:") == 4 and (tmp_path / "maps" / "maps.npz").exists()


def test_maps_writes_overlays_grid_and_arrays(tmp_path):
    result = xattn("maps", "a red circle and a blue square", "--words", "circle,blue square", "--steps", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00-circle.png", "01-blue-square.png", "grid.png", "image.png", "maps.npz"]
    maps = np.load(tmp_path / "maps.npz")
    assert sorted(maps.files) == ["blue square", "circle"] and maps["circle"].shape == (64, 64)
    xattn("maps", "a red circle", "--steps", "2", "--out", str(tmp_path / "all"))
    assert sorted(np.load(tmp_path / "all" / "maps.npz").files) == ["a", "circle", "red"]
    missing = xattn("maps", "a red circle", "--words", "square", "--steps", "2", "--out", str(tmp_path / "bad"))
    assert missing.returncode == 2 and "'square' is not a word of the prompt" in missing.stderr and "its words are: a, red, circle" in missing.stderr
