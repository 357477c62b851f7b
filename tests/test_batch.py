"""Batch runs on the embedded model: validation by line, resumption after a real SIGKILL, two processes."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.hostile_input import alias_bomb_words, png_header
from pipelines.batch import MANIFEST, RECORD, run_batch
from pipelines.erasure import save_erasure
from pipelines.inversion_cache import model_fingerprint
from pipelines.jobs import Job, read_jobs
from pipelines.loading import load_pipeline
from pipelines.unlearn import UnlearnSettings, unlearn
from shapes.judge import match_caption

COLOURS = ("red", "yellow", "green", "blue", "purple")
SHAPES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(None)


def generate_jobs(count: int, steps: int = 4) -> list[dict]:
    return [{"kind": "generate", "prompt": f"a {COLOURS[i % 5]} {SHAPES[i % 3]}", "seed": i, "steps": steps} for i in range(count)]


def write_jsonl(path, jobs) -> None:
    path.write_text("\n".join(json.dumps(j) for j in jobs) + "\n")


def records(out) -> dict[str, dict]:
    if not (out / "jobs").is_dir():
        return {}
    return {p.parent.name: json.loads(p.read_text()) for p in (out / "jobs").glob(f"*/{RECORD}")}


def xattn(*args):
    return subprocess.run([sys.executable, "-m", "ui.cli", *args], capture_output=True, text=True)


def test_problems_are_reported_by_line_and_the_rest_are_jobs(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join([
        json.dumps({"kind": "generate", "prompt": "a red circle"}),
        "",
        "# a comment",
        "{not json",
        json.dumps({"kind": "paint", "prompt": "x"}),
        json.dumps({"kind": "edit", "source": "a red circle"}),
        json.dumps({"kind": "generate", "prompt": "a red circle", "steps": "ten"}),
        json.dumps({"kind": "generate", "prompt": "a red circle", "colour": "red"}),
        json.dumps({"kind": "maps", "prompt": "a red circle", "id": "same"}),
        json.dumps({"kind": "maps", "prompt": "a blue circle", "id": "same"}),
    ]))
    listed = read_jobs(path)
    assert [(j.line, j.kind) for j in listed.jobs] == [(1, "generate"), (9, "maps")]
    assert [str(p) for p in listed.problems] == [
        "line 4: not valid JSON: Expecting property name enclosed in double quotes at column 2",
        "line 5: unknown kind 'paint'; use one of generate, maps, edit, compose, invert, flowedit, erase-then-generate",
        "line 6: edit needs 'target'",
        "line 7: 'steps' must be an integer; got 'ten'",
        "line 8: generate takes no 'colour'; it takes prompt, num, size, erasure, seed, steps, guidance",
        "line 10: id 'same' repeats line 9; give each job its own id",
    ]
    assert listed.jobs[0].id == Job(0, "generate", {"prompt": "a red circle"}).id  # derived from content alone
    yaml_path = tmp_path / "jobs.yaml"
    yaml_path.write_text("- kind: generate\n  prompt: a red circle\n\n- kind: compose\n  prompt: a red circle\n")
    listed = read_jobs(yaml_path)
    assert [j.line for j in listed.jobs] == [1] and [str(p) for p in listed.problems] == ["line 4: compose needs 'concepts'"]


def test_fifty_jobs_run_batched_then_a_rerun_skips_them(pipe, tmp_path):
    jobs = [Job(i + 1, j["kind"], {k: v for k, v in j.items() if k != "kind"}) for i, j in enumerate(generate_jobs(50))]
    jobs.append(Job(51, "maps", {"prompt": "a red circle", "words": ["square"]}))
    summary = run_batch(pipe, jobs, tmp_path, "embedded", progress=False)
    assert len(summary.done) == 50 and [p.line for p in summary.invalid] == [51] and not summary.ok
    found = records(tmp_path)
    assert len(found) == 50 and {r["batched_with"] for r in found.values()} == {8, 2}
    first = found[jobs[7].id]
    assert first["params"] == {"prompt": "a green square", "seed": 7, "steps": 4} and first["files"] == ["image-0.png"]
    assert first["versions"]["diffusers"].startswith("0.42") and first["model"] == "embedded"
    image = Image.open(tmp_path / "jobs" / jobs[7].id / "image-0.png")
    assert image.text["seed"] == "7" and image.text["prompt"] == "a green square"
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert len(manifest["jobs"]) == 51 and manifest["jobs"][-1]["status"] == "invalid"
    again = run_batch(pipe, jobs[:50], tmp_path, "embedded", progress=False)
    assert len(again.skipped) == 50 and not again.done and records(tmp_path) == found


def test_batched_generation_draws_what_one_at_a_time_draws(pipe, tmp_path):
    jobs = [Job(i + 1, "generate", {"prompt": p, "seed": 3 + i}) for i, p in enumerate(["a red circle", "a green triangle"])]
    run_batch(pipe, jobs, tmp_path / "together", "embedded", progress=False)
    run_batch(pipe, jobs, tmp_path / "apart", "embedded", batch_size=1, progress=False)
    for job in jobs:
        together, apart = (np.asarray(Image.open(tmp_path / f / "jobs" / job.id / "image-0.png"), dtype=int) for f in ("together", "apart"))
        assert np.abs(together - apart).max() <= 2 and match_caption(apart, job.params["prompt"]).ok


def test_a_failed_job_is_recorded_and_retried_on_request(pipe, tmp_path):
    erasure = tmp_path / "erase.safetensors"
    erasure.write_bytes(b"not a safetensors file")
    jobs = [Job(1, "generate", {"prompt": "a red circle", "erasure": str(erasure), "steps": 2})]
    summary = run_batch(pipe, jobs, tmp_path / "out", "embedded", progress=False)
    assert list(summary.failed) == [jobs[0].id] and records(tmp_path / "out")[jobs[0].id]["files"] == []
    again = run_batch(pipe, jobs, tmp_path / "out", "embedded", progress=False)
    assert "failed in an earlier run" in again.failed[jobs[0].id] and "--retry-failed" in again.failed[jobs[0].id]
    settings = UnlearnSettings(method="uce", concept="circle", guide="square", contexts=("a red circle",), preserve=("a red square",))
    save_erasure(erasure, unlearn(pipe, settings).tensors, method="uce", concept="circle", base=model_fingerprint(pipe), settings={})
    retried = run_batch(pipe, jobs, tmp_path / "out", "embedded", retry_failed=True, progress=False)
    assert retried.done == [jobs[0].id] and records(tmp_path / "out")[jobs[0].id]["files"] == ["image-0.png"]
    erasure.unlink()
    missing = run_batch(pipe, jobs, tmp_path / "gone", "embedded", progress=False)
    assert [p.reason for p in missing.invalid] == [f"no erasure file at {erasure}"] and not missing.done


def test_a_killed_run_resumes_and_every_job_is_done_once(tmp_path):
    path = tmp_path / "jobs.jsonl"
    write_jsonl(path, generate_jobs(30, steps=10))
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "ui.cli", "batch", str(path), "--out", str(out), "--batch-size", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(records(out)) < 5:
        assert first.poll() is None and time.monotonic() < deadline, "the batch ended or stalled before it could be killed"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = records(out)
    assert 5 <= len(before) < 30
    for folder in (out / "jobs").iterdir():
        if not folder.name.startswith("."):
            assert (folder / RECORD).is_file() and (folder / "image-0.png").is_file()  # nothing half-written is visible
    rerun = xattn("batch", str(path), "--out", str(out), "--batch-size", "1")
    assert rerun.returncode == 0, rerun.stderr
    assert f"{30 - len(before)} done, {len(before)} skipped" in rerun.stdout
    after = records(out)
    assert len(after) == 30 and all(after[k] == v for k, v in before.items())  # finished jobs were not redone
    assert not [f for f in (out / "jobs").iterdir() if f.name.startswith(".")]
    assert len({r["pid"] for r in after.values()}) == 2


def test_two_processes_share_the_jobs_and_match_one(tmp_path):
    path = tmp_path / "jobs.jsonl"
    write_jsonl(path, generate_jobs(8, steps=8) + [{"kind": "maps", "prompt": "a red circle", "steps": 8}])
    one = xattn("batch", str(path), "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ui.cli", "batch",
                          str(path), "--out", str(tmp_path / "two")], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("9 done") == 1  # one summary, from the main process
    single, shared = records(tmp_path / "one"), records(tmp_path / "two")
    assert single.keys() == shared.keys() and {r["process"] for r in shared.values()} == {0, 1}
    for job_id, record in single.items():
        assert record["files"] == shared[job_id]["files"]
        for name in record["files"]:
            if name.endswith(".png"):
                a, b = (np.asarray(Image.open(tmp_path / f / "jobs" / job_id / name), dtype=int) for f in ("one", "two"))
                assert np.abs(a - b).max() <= 2  # other thread counts round differently; nothing more
    manifest = json.loads((tmp_path / "two" / MANIFEST).read_text())
    assert sorted(j["id"] for j in manifest["jobs"]) == sorted(single) and {j["status"] for j in manifest["jobs"]} == {"done"}


def test_cli_reports_bad_lines_and_exits_non_zero(tmp_path):
    path = tmp_path / "jobs.jsonl"
    write_jsonl(path, [{"kind": "generate", "prompt": "a red circle", "steps": 2}, {"kind": "generate"}])
    result = xattn("batch", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert f"{path}: line 2: generate needs 'prompt'" in result.stderr
    assert "1 done, 0 skipped (done before), 0 failed, 1 invalid" in result.stdout


def test_ids_and_yaml_aliases_that_cannot_be_jobs_are_named(tmp_path):
    path = tmp_path / "jobs.jsonl"
    write_jsonl(path, [{"kind": "generate", "prompt": "a red circle", "id": given} for given in ("ok\n", 0, False, "")]
                + [{"kind": "generate", "prompt": "a red circle", "seed": 2**70}, {"kind": "generate", "prompt": "a", "guidance": 1e999}])
    listed = read_jobs(path)
    assert not listed.jobs
    assert [str(p) for p in listed.problems] == [
        "line 1: id 'ok\\n' must be a string of 1-64 letters, digits, '.', '_' or '-' (it names the job's folder)",
        "line 2: id 0 must be a string of 1-64 letters, digits, '.', '_' or '-' (it names the job's folder)",
        "line 3: id False must be a string of 1-64 letters, digits, '.', '_' or '-' (it names the job's folder)",
        "line 4: id '' must be a string of 1-64 letters, digits, '.', '_' or '-' (it names the job's folder)",
        f"line 5: 'seed' must be between 0 and {2**63 - 1}; got {2**70}",
        "line 6: 'guidance' must be a finite number; got inf",
    ]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("- kind: generate\n  prompt: a red circle\n- kind: maps\n  prompt: a red circle\n" + alias_bomb_words())
    began = time.perf_counter()
    listed = read_jobs(bomb)
    assert time.perf_counter() - began < 5
    assert [j.line for j in listed.jobs] == [1]
    assert [str(p) for p in listed.problems] == ["line 3: the job uses a YAML alias (*name); write its values out in full "
                                                 "(aliases can expand without bound)"]


def test_a_bad_job_fails_alone_and_leaves_the_next_as_a_clean_run_draws_it(pipe, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(100_000, 100_000))
    half = tmp_path / "half.safetensors"
    names = [n for n, _ in pipe.unet.named_parameters() if n.endswith("attn2.to_k.weight")][:2]
    params = dict(pipe.unet.named_parameters())
    save_erasure(half, {names[0]: params[names[0]].detach() * 0.5, names[1]: torch.zeros(3, 3)}, method="esd", concept="circle",
                 base=model_fingerprint(pipe), settings={})
    plain = {"prompt": "a red circle", "seed": 5, "steps": 4}
    jobs = [Job(1, "invert", {"image": str(bomb), "caption": "a red circle", "steps": 2}),
            Job(2, "generate", {**plain, "erasure": str(half)}),
            Job(3, "generate", {"prompt": "a blue square", "seed": 1, "steps": 4}),
            Job(4, "generate", {"prompt": "a blue square", "seed": 2**70, "steps": 4}),
            Job(5, "generate", {**plain, "id": "after"})]
    jobs[4].params.pop("id")
    jobs[4].id = "after"
    summary = run_batch(pipe, jobs, tmp_path / "out", "embedded", progress=False)
    assert set(summary.failed) == {jobs[0].id, jobs[1].id} and set(summary.done) == {jobs[2].id, "after"}
    assert "more than the 50 megapixels xattn reads" in summary.failed[jobs[0].id]
    assert "is (3, 3) but the denoiser's is" in summary.failed[jobs[1].id]
    assert [p.line for p in summary.invalid] == [4] and "--seed must be between 0 and" in summary.invalid[0].reason
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["jobs"][0]["status"] == "failed"
    clean = run_batch(pipe, [jobs[2], jobs[4]], tmp_path / "clean", "embedded", progress=False)  # the same pipeline call
    assert set(clean.done) == {jobs[2].id, "after"}
    after, alone = (np.asarray(Image.open(tmp_path / f / "jobs" / "after" / "image-0.png")) for f in ("out", "clean"))
    assert np.array_equal(after, alone)


def test_an_id_given_other_content_is_redone_and_said_so(pipe, tmp_path):
    first = run_batch(pipe, [Job(1, "generate", {"prompt": "a red circle", "steps": 3}, "mine")], tmp_path, "embedded", progress=False)
    assert first.done == ["mine"]
    changed = run_batch(pipe, [Job(1, "generate", {"prompt": "a blue square", "steps": 3}, "mine")], tmp_path, "embedded",
                        progress=False)
    assert changed.done == ["mine"] and changed.redone == ["mine"] and not changed.skipped
    assert "redone mine: its content changed since the run that made jobs/mine" in str(changed)
    assert Image.open(tmp_path / "jobs" / "mine" / "image-0.png").text["prompt"] == "a blue square"


def test_a_folder_in_use_by_another_run_is_refused(pipe, tmp_path):
    import fcntl

    (tmp_path / "jobs").mkdir()
    with open(tmp_path / ".lock-0", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="is in use by another xattn batch run; wait for it to finish, or give another --out"):
            run_batch(pipe, [Job(1, "generate", {"prompt": "a red circle", "steps": 2})], tmp_path, "embedded", progress=False)
    assert run_batch(pipe, [Job(1, "generate", {"prompt": "a red circle", "steps": 2})], tmp_path, "embedded", progress=False).done
