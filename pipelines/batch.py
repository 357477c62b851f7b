"""Batch runs: many jobs (`pipelines.jobs`) on one pipeline, resumable, shared across processes.

    summary = run_batch(pipe, read_jobs("jobs.jsonl").jobs, out="runs/sweep", model="embedded")

Each job writes OUT/jobs/<id>/ (its images and record.json: parameters, model, library versions,
status, and the seconds of the pipeline call it ran in, shared with the jobs batched with it). The
folder is built hidden and renamed into place when complete, so a job's folder either is whole or
is not there. A rerun skips finished jobs, redoes the rest (and any whose content changed under
the same id), and redoes failed ones with `retry_failed`. Whatever a job raises fails that job
alone. One run at a time holds OUT. Under `accelerate launch` (or torchrun) process k of n takes
every n-th job, and the main process writes OUT/manifest.json once all are done. Generate jobs
that share their sampling settings run as one pipeline call of up to `batch_size` prompts, each
with its own seeded noise.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from pipelines.dpl import find_nouns
from pipelines.edit import blend_for, choose_edit, describe, parse_window, prompt_to_prompt
from pipelines.erasure import apply_erasure, load_erasure
from pipelines.files import save_png
from pipelines.flow import is_flow_matching
from pipelines.flowedit import FlowEditSettings, flow_edit, settings_for
from pipelines.generate import GenerationSettings, check_sampling, check_size, finite_images, generate
from pipelines.guidance import METHODS as COMPOSE_METHODS
from pipelines.guidance import compose
from pipelines.images import psnr
from pipelines.inversion import METHODS as INVERSIONS
from pipelines.inversion import invert, reconstruct
from pipelines.jobs import Job, Problem
from pipelines.maps import generate_with_maps, write_maps
from pipelines.messages import bounded
from pipelines.unlearn import METHODS as ERASERS
from pipelines.unlearn import UnlearnSettings, template_prompts, unlearn, with_defaults
from xattn.heatmap import grid
from xattn.tokens import pipeline_tokenizer, pipeline_word_tokens

RECORD = "record.json"
MANIFEST = "manifest.json"
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "xattn")


@dataclass
class Summary:
    """What a run did: job ids done now, skipped (done before), failed (id -> reason), invalid problems, and the ids
    redone because their content changed since the run that made their folder."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    invalid: list[Problem] = field(default_factory=list)
    redone: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.invalid

    def __str__(self) -> str:
        lines = [f"{len(self.done)} done, {len(self.skipped)} skipped (done before), {len(self.failed)} failed, "
                 f"{len(self.invalid)} invalid"]
        lines += [f"  redone {job}: its content changed since the run that made jobs/{job}" for job in self.redone]
        lines += [f"  failed {job}: {reason}" for job, reason in self.failed.items()]
        lines += [f"  invalid {problem}" for problem in self.invalid]
        return "\n".join(lines)


def process_state() -> PartialState:
    """This process's place among those `accelerate launch` or torchrun started (CPU processes talk over gloo)."""
    return PartialState(cpu=not torch.cuda.is_available())


def _sampling(params: dict) -> dict:
    return {"seed": params.get("seed", 0), "steps": params.get("steps", 25), "guidance": float(params.get("guidance", 5.0))}


def check_job(pipe: DiffusionPipeline, job: Job) -> None:
    """What can be known before running: numbers in range, words in their prompts, files present, methods and sizes
    that exist."""
    p = job.params
    if job.kind in ("generate", "maps", "edit", "compose", "invert"):
        sampling = _sampling(p)
        check_sampling(pipe, sampling["steps"], sampling["guidance"], sampling["seed"], p.get("num", 1))
    if job.kind == "generate":
        check_size(pipe, p.get("size"))
        if "erasure" in p and not Path(p["erasure"]).is_file():
            raise ValueError(f"no erasure file at {p['erasure']}")
    if job.kind == "maps":
        for word in p.get("words", []):
            pipeline_word_tokens(pipe, p["prompt"], word)
    if job.kind == "edit":
        tokenizer = pipeline_tokenizer(pipe)
        choose_edit(tokenizer, p["source"], p["target"], p.get("mode", "auto"), p.get("reweight", {}))
        if p.get("blend"):
            blend_for(tokenizer, p["source"], p["target"], p["blend"])
        for name in ("cross_steps", "self_steps"):
            if name in p:
                parse_window(str(p[name]))
    if job.kind == "compose":
        if p.get("method", "astar") not in COMPOSE_METHODS:
            raise ValueError(f"unknown method {p['method']!r}; use one of {', '.join(COMPOSE_METHODS)}")
        for word in p["concepts"]:
            pipeline_word_tokens(pipe, p["prompt"], word)
    if job.kind in ("edit", "invert"):
        if p.get("inversion", "direct") not in INVERSIONS:
            raise ValueError(f"unknown inversion {p['inversion']!r}; use one of {', '.join(INVERSIONS)}")
        if "image" in p and not Path(p["image"]).is_file():
            raise ValueError(f"no image file at {p['image']}")
        if p.get("inversion") in ("dpl", "dpl-direct"):
            find_nouns(pipe, p.get("caption", p.get("source")), p.get("nouns", []))
    if job.kind == "flowedit":
        settings = _flowedit_settings(pipe, p)
        check_sampling(pipe, settings.steps, settings.target_guidance, p.get("seed", 0))
        if not Path(p["image"]).is_file():
            raise ValueError(f"no image file at {p['image']}")
    if job.kind == "erase-then-generate" and p.get("method", "uce") not in ERASERS:
        raise ValueError(f"unknown unlearning method {p['method']!r}; use one of {', '.join(ERASERS)}")


def _generate_many(pipe: DiffusionPipeline, jobs: list[Job], folders: dict[str, Path], model: str) -> None:
    """Generate jobs with one sampling setting as one pipeline call: image i of a job uses seed + i."""
    first = jobs[0].params
    sampling = _sampling(first)
    side = check_size(pipe, first.get("size"))
    prompts, generators, owners = [], [], []
    for job in jobs:
        for i in range(job.params.get("num", 1)):
            prompts.append(job.params["prompt"])
            generators.append(torch.Generator(device="cpu").manual_seed(job.params.get("seed", 0) + i))
            owners.append((job, i))
    images = finite_images(pipe(prompts, num_inference_steps=sampling["steps"], guidance_scale=sampling["guidance"], height=side,
                                width=side, generator=generators, output_type="np").images)
    for image, (job, i) in zip(images, owners):
        settings = GenerationSettings(job.params["prompt"], **_sampling(job.params))
        save_png(image, folders[job.id] / f"image-{i}.png", settings.metadata(model, settings.seed + i))


def _maps(pipe, job: Job, folder: Path, model: str) -> None:
    settings = GenerationSettings(job.params["prompt"], **_sampling(job.params))
    image, maps = generate_with_maps(pipe, settings, job.params.get("words"))
    write_maps(folder, image, maps, settings.metadata(model))


def _edit(pipe, job: Job, folder: Path, model: str) -> None:
    p = job.params
    sampling = _sampling(p)
    tokenizer = pipeline_tokenizer(pipe)
    edit = choose_edit(tokenizer, p["source"], p["target"], p.get("mode", "auto"), p.get("reweight", {}))
    blend = blend_for(tokenizer, p["source"], p["target"], p["blend"]) if p.get("blend") else None
    inversion = None
    if "image" in p:
        inversion = invert(pipe, p["image"], p["source"], method=p.get("inversion", "direct"), steps=sampling["steps"],
                           guidance=sampling["guidance"], nouns=p.get("nouns", ()), cache_dir=None)
    result = prompt_to_prompt(pipe, [p["source"], p["target"]], edit, cross_steps=parse_window(str(p.get("cross_steps", "0.8"))),
                              self_steps=parse_window(str(p.get("self_steps", "0.4"))), blend=blend, inversion=inversion, **sampling)
    meta = {"source": p["source"], "target": p["target"], "edit": describe(edit), "model": model, **sampling}
    source, target = result.images
    for name, image in (("source.png", source), ("target.png", target)):
        save_png(image, folder / name, meta)


def _compose(pipe, job: Job, folder: Path, model: str) -> None:
    p = job.params
    sampling = _sampling(p)
    result = compose(pipe, p["prompt"], p["concepts"], method=p.get("method", "astar"), **sampling)
    image = result.images[0]
    meta = {"prompt": p["prompt"], "concepts": ",".join(p["concepts"]), "method": p.get("method", "astar"), "model": model, **sampling}
    write_maps(folder, image, result.maps(0, size=image.size[::-1]), meta)


def _invert(pipe, job: Job, folder: Path, model: str) -> dict:
    p = job.params
    inversion = invert(pipe, p["image"], p["caption"], method=p.get("inversion", "direct"), steps=p.get("steps", 25),
                       guidance=float(p.get("guidance", 5.0)), nouns=p.get("nouns", ()), cache_dir=None)
    redrawn = reconstruct(pipe, inversion)
    meta = {"image": p["image"], "caption": p["caption"], "inversion": inversion.method, "model": model}
    save_png(inversion.image, folder / "input.png", meta)
    save_png(redrawn, folder / "reconstruction.png", meta)
    return {"psnr_db": psnr(redrawn, inversion.image)}


def _flowedit_settings(pipe, p: dict) -> FlowEditSettings:
    if not is_flow_matching(pipe.scheduler):
        raise ValueError(f"flowedit jobs edit with a flow-matching model (SD3, Flux); {type(pipe).__name__} samples a diffusion: "
                         "use an edit job with an image")
    return settings_for(pipe, **{name: p.get(name) for name in ("steps", "n_max", "source_guidance", "target_guidance")})


def _flowedit(pipe, job: Job, folder: Path, model: str) -> None:
    p = job.params
    settings = _flowedit_settings(pipe, p)
    result = flow_edit(pipe, p["image"], p["source"], p["target"], settings=settings, seed=p.get("seed", 0))
    meta = {"image": p["image"], "source": p["source"], "target": p["target"], "seed": p.get("seed", 0), "model": model,
            **asdict(settings)}
    for name, image in zip(("input.png", "target.png"), result.images):
        save_png(image, folder / name, meta)


def _erase_then_generate(pipe, job: Job, folder: Path, model: str) -> dict:
    p = job.params
    kept = template_prompts(p.get("preserve", []))
    settings = UnlearnSettings(method=p.get("method", "uce"), concept=p["concept"], guide=p.get("guide", ""), preserve=kept,
                               steps=p.get("train_steps", 0), seed=p.get("seed", 0))
    erased = unlearn(pipe, with_defaults(settings, model), progress=False)
    seed = p.get("seed", 0)
    before = [generate(pipe, GenerationSettings(prompt, seed=seed))[0] for prompt in p["prompts"]]
    with apply_erasure(pipe, erased.tensors):
        after = [generate(pipe, GenerationSettings(prompt, seed=seed))[0] for prompt in p["prompts"]]
    meta = {"concept": p["concept"], "method": settings.method, "guide": settings.guide, "seed": seed, "model": model}
    save_png(grid(before + after, [f"before: {q}" for q in p["prompts"]] + [f"after: {q}" for q in p["prompts"]],
                  columns=len(p["prompts"])), folder / "before-after.png", meta)
    return {"train_seconds": erased.record["seconds"], "changed_tensors": len(erased.tensors)}


RUNNERS: dict[str, Callable] = {"maps": _maps, "edit": _edit, "compose": _compose, "invert": _invert, "flowedit": _flowedit,
                                "erase-then-generate": _erase_then_generate}


def _versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    os.replace(tmp, path)


def read_record(out: Path, job_id: str) -> dict | None:
    path = out / "jobs" / job_id / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


class _Folders:
    """Each job's hidden work folder, renamed into place (with its record) only when complete."""

    def __init__(self, out: Path) -> None:
        self.root = out / "jobs"

    def work(self, job: Job) -> Path:
        folder = self.root / f".{job.id}.tmp-{os.getpid()}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        return folder

    def finish(self, job: Job, work: Path, record: dict) -> None:
        _write_json(work / RECORD, record)
        final = self.root / job.id
        if final.exists():
            shutil.rmtree(final)  # a failed attempt's record; the job is redone as a whole
        os.replace(work, final)


def _clear_abandoned(out: Path) -> None:
    """Work folders of killed runs (hidden, never a finished job): remove them."""
    for stale in (out / "jobs").glob(".*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def run_batch(
    pipe: DiffusionPipeline,
    jobs: list[Job],
    out: Path | str,
    model: str,
    *,
    invalid: list[Problem] | None = None,
    retry_failed: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> Summary:
    """Run this process's share of `jobs` into OUT; the main process writes the manifest and returns the whole summary."""
    out = Path(out)
    state = process_state()
    summary = Summary(invalid=list(invalid or []))
    runnable = []
    for job in jobs:
        try:
            check_job(pipe, job)
            runnable.append(job)
        except (ValueError, OSError) as error:
            summary.invalid.append(Problem(job.line, bounded(str(error)), job.id))
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    with _lock(out, state.process_index):
        if state.is_main_process:
            _clear_abandoned(out)
        state.wait_for_everyone()
        versions = _versions()
        _run_mine(pipe, runnable[state.process_index :: state.num_processes], out, model, versions, summary, state, retry_failed,
                  batch_size, progress)
        return _gather(out, jobs, summary, model, versions, state)


@contextmanager
def _lock(out: Path, index: int) -> Iterator[None]:
    """Hold OUT/.lock-<process> for the run: a second run on the same folder is refused instead of redoing every job.
    The system drops the lock when the process ends, however it ends."""
    handle = open(out / f".lock-{index}", "w")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{out} is in use by another xattn batch run; wait for it to finish, or give another --out") from None
        yield
    finally:
        handle.close()


def _pending(out: Path, mine: list[Job], summary: Summary, retry_failed: bool) -> list[Job]:
    """The jobs to run now: not done before, or done with other content under the same id (redone, and said so)."""
    pending = []
    for job in mine:
        record = read_record(out, job.id)
        if record and (record["kind"], record["params"]) != (job.kind, json.loads(json.dumps(job.params))):
            summary.redone.append(job.id)
            pending.append(job)
        elif record and record["status"] == "done":
            summary.skipped.append(job.id)
        elif record and not retry_failed:
            summary.failed[job.id] = f"failed in an earlier run: {record['error']} (rerun with --retry-failed)"
        else:
            pending.append(job)
    return pending


def _run_group(pipe: DiffusionPipeline, group: list[Job], works: dict[str, Path], model: str) -> dict:
    if group[0].kind == "generate":
        erasure = group[0].params.get("erasure")
        with load_erasure(pipe, erasure) if erasure else nullcontext():
            _generate_many(pipe, group, works, model)
        return {}
    return RUNNERS[group[0].kind](pipe, group[0], works[group[0].id], model) or {}


@dataclass
class _Attempt:
    """One pipeline call's outcome for its jobs: their work folders, status, error, extra record fields and seconds."""

    works: dict[str, Path]
    status: str
    error: str | None
    extra: dict
    seconds: float


def _attempt(pipe: DiffusionPipeline, group: list[Job], folders: _Folders, model: str) -> _Attempt:
    works = {job.id: folders.work(job) for job in group}
    began = time.perf_counter()
    try:
        extra = _run_group(pipe, group, works, model)
        return _Attempt(works, "done", None, extra, time.perf_counter() - began)
    except Exception as failure:  # noqa: BLE001 - whatever a job raises fails that job, never the run
        reason = str(failure) if isinstance(failure, (ValueError, OSError)) else f"{type(failure).__name__}: {failure}"
        for work in works.values():
            for leftover in work.iterdir():
                leftover.unlink()
        return _Attempt(works, "failed", bounded(reason), {}, time.perf_counter() - began)


def _run_mine(pipe: DiffusionPipeline, mine: list[Job], out: Path, model: str, versions: dict[str, str], summary: Summary,
              state: PartialState, retry_failed: bool, batch_size: int, progress: bool) -> None:
    """Run this process's jobs, generate jobs in groups. Any error fails its job alone, recorded with its reason: a
    failed group's jobs are each run again on their own."""
    folders = _Folders(out)
    pending = _pending(out, mine, summary, retry_failed)
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(mine), initial=len(mine) - len(pending), desc=f"jobs (process {state.process_index})", unit="job",
               disable=not progress)
    while pending:
        group = _next_group(pending, batch_size)
        pending = pending[len(group):]
        attempt = _attempt(pipe, group, folders, model)
        runs = [(group, attempt)]
        if attempt.status == "failed" and len(group) > 1:
            runs = [([job], _attempt(pipe, [job], folders, model)) for job in group]
        for jobs, outcome in runs:
            for job in jobs:
                record = {"id": job.id, "kind": job.kind, "line": job.line, "params": job.params, "status": outcome.status,
                          "error": outcome.error, "files": sorted(f.name for f in outcome.works[job.id].iterdir()), "model": model,
                          "versions": versions, "seconds": outcome.seconds, "batched_with": len(jobs),
                          "process": state.process_index, "pid": os.getpid(), "finished": time.time(), **outcome.extra}
                folders.finish(job, outcome.works[job.id], record)
                if outcome.status == "done":
                    summary.done.append(job.id)
                else:
                    summary.failed[job.id] = outcome.error
                bar.update()
    bar.close()


def _next_group(pending: list[Job], batch_size: int) -> list[Job]:
    """The next job, with the following generate jobs that can share its pipeline call."""
    first = pending[0]
    if first.kind != "generate":
        return [first]
    key = _batch_key(first)
    group = [first]
    for job in pending[1:]:
        if len(group) == batch_size or job.kind != "generate" or _batch_key(job) != key:
            break
        group.append(job)
    return group


def _batch_key(job: Job) -> tuple:
    p = job.params
    return (p.get("steps", 25), float(p.get("guidance", 5.0)), p.get("size"), p.get("erasure"))


def _gather(out: Path, jobs: list[Job], summary: Summary, model: str, versions: dict[str, str], state: PartialState) -> Summary:
    """Every process's summary, merged; the main process writes OUT/manifest.json (every job's status)."""
    part = out / f".summary-{state.process_index}.json"
    _write_json(part, {"done": summary.done, "skipped": summary.skipped, "failed": summary.failed, "redone": summary.redone})
    state.wait_for_everyone()
    whole = Summary(invalid=sorted(summary.invalid, key=lambda p: p.line))
    for k in range(state.num_processes):
        other = json.loads((out / f".summary-{k}.json").read_text())
        whole.done += other["done"]
        whole.skipped += other["skipped"]
        whole.failed |= other["failed"]
        whole.redone += other["redone"]
    state.wait_for_everyone()
    if state.is_main_process:
        invalid = {p.id for p in whole.invalid}
        entries = []
        for job in jobs:
            if job.id not in invalid:
                record = read_record(out, job.id)
                entries.append({"id": job.id, "kind": job.kind, "line": job.line, "status": record["status"] if record else "missing"})
        entries += [{"id": p.id, "line": p.line, "status": "invalid", "reason": p.reason} for p in whole.invalid]
        _write_json(out / MANIFEST, {"model": model, "versions": versions, "jobs": entries})
        for k in range(state.num_processes):
            (out / f".summary-{k}.json").unlink()
    return whole
