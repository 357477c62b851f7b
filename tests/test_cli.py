import contextlib
import io
import logging
import subprocess
import sys

import diffusers
import numpy as np
import transformers
from PIL import Image

from ui.cli import main


def xattn(*args: str) -> subprocess.CompletedProcess:
    """The command line run in this process as a shell runs it (exit status, stdout, stderr), without paying the
    libraries' imports again for every call; the libraries' logging is put back as it was. tests/test_readme.py runs
    the commands in fresh processes, and so do the tests below that need one."""
    out, err = io.StringIO(), io.StringIO()
    libraries = (transformers.utils.logging, diffusers.utils.logging)
    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    warnings = logging.StreamHandler(err)  # what Python prints to stderr for a warning logged with no handler configured
    logging.getLogger().addHandler(warnings)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        if isinstance(exit_.code, str):
            err.write(exit_.code)
    finally:
        logging.getLogger().removeHandler(warnings)
        for lib, (verbosity, bars) in zip(libraries, before):
            lib.set_verbosity(verbosity)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def xattn_process(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The command line in a fresh process, for what one process cannot show twice (library chatter, the import path)."""
    return subprocess.run([sys.executable, "-m", "ui.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_generate_writes_pngs_with_their_settings(tmp_path):
    result = xattn("generate", "a green triangle on the left", "--seed", "5", "--steps", "3", "--num", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a-green-triangle-on-the-left-seed5.png", "a-green-triangle-on-the-left-seed6.png"]
    image = Image.open(paths[1])
    assert image.size == (64, 64)
    assert image.text == {"prompt": "a green triangle on the left", "seed": "6", "steps": "3", "guidance": "5.0", "model": "embedded"}
    assert "3/3 [" in result.stderr  # the progress bar


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
    assert index.count("judge:") == 4 + 3 + 4 * 2 and (tmp_path / "maps" / "maps.npz").exists()
    edits = sorted((tmp_path / "edit").glob("*.png"))
    assert len(edits) == 3 and index.count("judge on the edit") == 4 and "refine (added words)" in index
    assert len(list((tmp_path / "real").glob("*.png"))) == 1 and "inverted with direct" in index
    assert sorted(p.name for p in (tmp_path / "compose").glob("*.png")) == ["astar.png", "attend-excite.png", "none.png"]
    assert "astar: a blue circle, a red triangle and a green square" in index
    assert sorted(p.name for p in (tmp_path / "unlearn").glob("*.png")) == ["esd-x.png", "fmn.png", "salun.png", "uce.png"]
    assert index.count("where no match is the success (the circle should be gone)") == 4 and index.count("should still match") == 4
    assert "uce, circle erased</b><br>after erasing, a red circle: judge: no match" in index


def test_maps_writes_overlays_grid_and_arrays(tmp_path):
    result = xattn("maps", "a red circle and a blue square", "--words", "circle,blue square", "--steps", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00-circle.png", "01-blue-square.png", "grid.png", "image.png", "maps.npz"]
    maps = np.load(tmp_path / "maps.npz")
    assert sorted(maps.files) == ["blue square", "circle"] and maps["circle"].shape == (64, 64)
    xattn("maps", "a red circle", "--steps", "2", "--out", str(tmp_path / "all"))
    assert sorted(np.load(tmp_path / "all" / "maps.npz").files) == ["a", "circle", "red"]
    xattn("maps", "a red circle", "--words", "red", "--steps", "2", "--out", str(tmp_path / "all"))  # the same folder again
    assert sorted(p.name for p in (tmp_path / "all").glob("*-*.png")) == ["00-red.png"]
    missing = xattn("maps", "a red circle", "--words", "square", "--steps", "2", "--out", str(tmp_path / "bad"))
    assert missing.returncode == 2 and "'square' is not a word of the prompt" in missing.stderr and "its words are: a, red, circle" in missing.stderr


def test_compose_writes_the_image_and_the_concepts_maps(tmp_path):
    result = xattn("compose", "a red circle and a blue square", "--concepts", "circle,square", "--steps", "4", "--seed", "2",
                   "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-circle.png", "01-square.png", "grid.png", "image.png", "maps.npz"]
    maps = np.load(tmp_path / "maps.npz")
    assert sorted(maps.files) == ["circle", "square"] and maps["circle"].shape == (64, 64) and maps["circle"].max() == 1.0
    image = Image.open(tmp_path / "image.png")
    assert image.text["method"] == "astar" and image.text["concepts"] == "circle,square" and image.text["seed"] == "2"
    several = xattn("compose", "a red circle and a blue square", "--concepts", "circle,square", "--method", "attend-excite",
                    "--steps", "2", "--num", "2", "--out", str(tmp_path / "n"))
    assert several.returncode == 0, several.stderr
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["a-red-circle-and-a-blue-square-seed0", "a-red-circle-and-a-blue-square-seed1"]
    missing = xattn("compose", "a red circle", "--concepts", "circle,square", "--steps", "2", "--out", str(tmp_path / "bad"))
    assert missing.returncode == 2 and "'square' is not a word of the prompt" in missing.stderr and "Traceback" not in missing.stderr


def test_edit_writes_source_target_and_side_by_side_and_says_which_edit(tmp_path):
    result = xattn("edit", "a red circle", "a red square", "--steps", "3", "--blend", "circle", "square", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "edit: replace (word swap)" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["side-by-side.png", "source.png", "target.png"]
    target = Image.open(tmp_path / "target.png")
    assert target.size == (64, 64) and target.text["edit"] == "replace (word swap)" and target.text["blend"] == "circle,square"
    refine = xattn("edit", "a red circle", "a red circle and a blue square", "--steps", "2", "--reweight", "blue=2", "--out", str(tmp_path / "r"))
    assert refine.returncode == 0 and "edit: reweight (blue=2) on refine (added words)" in refine.stderr


def test_edit_writes_the_maps_the_edit_drew(tmp_path):
    result = xattn("edit", "a red circle", "a red square", "--steps", "3", "--cross-steps", "1.0", "--maps", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    source, target = np.load(tmp_path / "maps-source" / "maps.npz"), np.load(tmp_path / "maps-target" / "maps.npz")
    assert sorted(source.files) == ["a", "circle", "red"] and sorted(target.files) == ["a", "red", "square"]
    assert np.abs(target["square"] - source["circle"]).max() < 1e-5  # injected at every step: the source's map
    assert (tmp_path / "maps-target" / "grid.png").exists() and str(tmp_path / "maps-target" / "maps.npz") in result.stdout
    again = xattn("edit", "a blue circle", "a blue triangle", "--steps", "2", "--out", str(tmp_path))  # no --maps this time
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["side-by-side.png", "source.png", "target.png"]


def test_edit_explains_bad_input(tmp_path):
    swap = xattn("edit", "a red circle", "a big red circle", "--mode", "replace", "--out", str(tmp_path))
    assert swap.returncode == 2 and "same number of words" in swap.stderr and "refine" in swap.stderr and "Traceback" not in swap.stderr
    blend = xattn("edit", "a red circle", "a red square", "--blend", "triangle", "--out", str(tmp_path))
    assert blend.returncode == 2 and "blend word 'triangle' is in neither" in blend.stderr
    steps = xattn("edit", "a red circle", "a red square", "--cross-steps", "0.2,0.9,1", "--out", str(tmp_path))
    assert steps.returncode == 2 and "is not a schedule" in steps.stderr


def test_invert_and_edit_a_real_image(tmp_path):
    from shapes.scenes import make_scene

    scene = make_scene(7_000_002)  # "a blue circle above a yellow circle", drawn at 96 px to be fitted
    photo = tmp_path / "photo.png"
    Image.fromarray(scene.image).resize((96, 96), Image.Resampling.NEAREST).save(photo)
    cache = tmp_path / "cache"
    inverted = xattn("invert", scene.caption, "--image", str(photo), "--steps", "5", "--cache", str(cache), "--out", str(tmp_path / "inv"))
    assert inverted.returncode == 0, inverted.stderr
    assert "resized 96x96 to the model's 64x64" in inverted.stderr and "inverted" in inverted.stderr and "with direct" in inverted.stderr
    psnr = float(inverted.stdout.split("reconstruction PSNR: ")[1].split()[0])
    assert psnr > 25 and Image.open(tmp_path / "inv" / "reconstruction.png").text["psnr_db"] == f"{psnr:.2f}"
    target = scene.caption.replace("blue circle", "blue square")
    edited = xattn("edit", "--image", str(photo), scene.caption, target, "--steps", "5", "--cache", str(cache), "--out", str(tmp_path / "edit"))
    assert edited.returncode == 0, edited.stderr
    assert "from the cache" in edited.stderr
    assert Image.open(tmp_path / "edit" / "side-by-side.png").size[0] == 3 * Image.open(tmp_path / "edit" / "target.png").size[0] * 4
    missing = xattn("invert", "a red circle", "--image", str(tmp_path / "nope.png"), "--out", str(tmp_path))
    assert missing.returncode == 2 and "no image file at" in missing.stderr and "Traceback" not in missing.stderr


def test_unlearn_explains_bad_input(tmp_path):
    """The default erasure's figures are checked where the README runs it (tests/test_readme.py)."""
    unknown = xattn("unlearn", "--concept", "zxqvw", "--out", str(tmp_path))
    assert unknown.returncode == 2 and "not a word of the tokenizer's vocabulary" in unknown.stderr and "Traceback" not in unknown.stderr
    unguided = xattn("unlearn", "--concept", "circle", "--method", "esd-x", "--out", str(tmp_path))
    assert unguided.returncode == 2 and "on the embedded model ESD needs --guide" in unguided.stderr


def test_a_package_that_hides_one_of_xattns_is_named_with_the_fix(tmp_path):
    (tmp_path / "shapes").mkdir()
    (tmp_path / "shapes" / "__init__.py").write_text("")
    result = xattn_process("generate", "a red circle", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"xattn's package 'shapes'" in result.stderr and f"is hidden: the one at {tmp_path / 'shapes'}" in result.stderr
    assert "uninstall the other distribution" in result.stderr


def test_commands_print_no_library_chatter_unless_verbose(tmp_path):
    quiet = xattn_process("generate", "a red circle", "--steps", "2", "--out", str(tmp_path))
    assert quiet.returncode == 0, quiet.stderr
    lines = [line for line in quiet.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and all("/2 [" in line for line in lines), quiet.stderr  # the one progress bar, nothing else
    loud = xattn_process("--verbose", "generate", "a red circle", "--steps", "2", "--out", str(tmp_path))
    assert loud.returncode == 0 and "Loading pipeline components" in loud.stderr
