"""Batch jobs: what a line of a JOBS file may say, read and checked before anything runs.

A job is a mapping with a `kind` (generate, maps, edit, compose, invert, flowedit, erase-then-generate), that
kind's parameters and an optional `id` (otherwise a digest of its content, so the same job keeps its
id across reruns). JOBS is JSON Lines (one job per line) or YAML (a list of jobs). Every problem is
reported with the job's line number; the good jobs still run.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipelines.limits import MAX_SEED
from pipelines.messages import bounded

# kind -> {parameter: (types, required)}
_SAMPLING = {"seed": ((int,), False), "steps": ((int,), False), "guidance": ((int, float), False)}
KINDS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "generate": {"prompt": ((str,), True), "num": ((int,), False), "size": ((int,), False), "erasure": ((str,), False), **_SAMPLING},
    "maps": {"prompt": ((str,), True), "words": ((list,), False), **_SAMPLING},
    "edit": {"source": ((str,), True), "target": ((str,), True), "mode": ((str,), False), "reweight": ((dict,), False),
             "blend": ((list,), False), "cross_steps": ((str, int, float), False), "self_steps": ((str, int, float), False),
             "image": ((str,), False), "inversion": ((str,), False), "nouns": ((list,), False), **_SAMPLING},
    "compose": {"prompt": ((str,), True), "concepts": ((list,), True), "method": ((str,), False), **_SAMPLING},
    "invert": {"image": ((str,), True), "caption": ((str,), True), "inversion": ((str,), False), "nouns": ((list,), False),
               "steps": ((int,), False), "guidance": ((int, float), False)},
    "flowedit": {"image": ((str,), True), "source": ((str,), True), "target": ((str,), True), "seed": ((int,), False),
                 "steps": ((int,), False), "n_max": ((int,), False), "source_guidance": ((int, float), False),
                 "target_guidance": ((int, float), False)},
    "erase-then-generate": {"concept": ((str,), True), "prompts": ((list,), True), "method": ((str,), False),
                            "guide": ((str,), False), "preserve": ((list,), False), "train_steps": ((int,), False),
                            "seed": ((int,), False)},
}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class Job:
    """One job of a batch: where it came from, what it is, its parameters and its id."""

    line: int
    kind: str
    params: dict
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            content = json.dumps({"kind": self.kind, **self.params}, sort_keys=True)
            self.id = f"{self.kind}-{hashlib.sha256(content.encode()).hexdigest()[:12]}"


@dataclass
class Problem:
    """A job that cannot run: its line in the JOBS file and why."""

    line: int
    reason: str
    id: str | None = None

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class JobList:
    jobs: list[Job] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def check_fields(kind: str, params: dict) -> None:
    """The parameters a kind takes, of the right types; a ValueError naming the first that is not."""
    spec = KINDS.get(kind)
    if spec is None:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    unknown = sorted(set(params) - set(spec))
    if unknown:
        raise ValueError(f"{kind} takes no {', '.join(map(repr, unknown))}; it takes {', '.join(spec)}")
    for name, (types, required) in spec.items():
        if name not in params:
            if required:
                raise ValueError(f"{kind} needs {name!r}")
            continue
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join(_TYPE_NAMES[t] for t in types if not (t is int and float in types))
            raise ValueError(f"{name!r} must be {wanted}; got {value!r}")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name!r} must be a list of words or prompts (strings); got {value!r}")
    for name in ("steps", "num", "train_steps"):
        if name in params and params[name] < (0 if name == "train_steps" else 1):
            raise ValueError(f"{name!r} must be positive; got {params[name]}")
    if "seed" in params and not 0 <= params["seed"] <= MAX_SEED:
        raise ValueError(f"'seed' must be between 0 and {MAX_SEED}; got {params['seed']}")
    if "guidance" in params and not math.isfinite(params["guidance"]):
        raise ValueError(f"'guidance' must be a finite number; got {params['guidance']}")
    for word, scale in params.get("reweight", {}).items():
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"'reweight' maps words to finite numbers; got {word!r}: {scale!r}")


def _job(raw: object, line: int) -> Job:
    if not isinstance(raw, dict):
        raise ValueError(f"a job is a mapping with a 'kind'; got {type(raw).__name__}")
    params = dict(raw)
    kind, named, given = params.pop("kind", None), "id" in params, params.pop("id", None)
    if kind is None:
        raise ValueError("the job has no 'kind'")
    check_fields(kind, params)
    if named and not (isinstance(given, str) and ID.fullmatch(given)):
        raise ValueError(f"id {given!r} must be a string of 1-64 letters, digits, '.', '_' or '-' (it names the job's folder)")
    return Job(line, kind, params, given or "")


_ALIAS = "the job uses a YAML alias (*name); write its values out in full (aliases can expand without bound)"


def _shares_nodes(node: yaml.Node, seen: set[int]) -> bool:
    """Whether `node` reaches a node already `seen` (here or in an earlier job): what an alias is once composed. Each
    node is visited once, so a nest of aliases is found without expanding it."""
    stack = [node]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            return True
        seen.add(id(current))
        if isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
        elif isinstance(current, yaml.MappingNode):
            stack.extend(part for pair in current.value for part in pair)
    return False


def _entries(path: Path) -> list[tuple[int, object | Exception]]:
    """(line, parsed job or the parse error) for each job of a JSONL or YAML file."""
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            node = yaml.compose(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            return [((mark.line + 1) if mark else 1, ValueError(f"not valid YAML: {getattr(error, 'problem', error)}"))]
        if node is None:
            return []
        if not isinstance(node, yaml.SequenceNode):
            return [(node.start_mark.line + 1, ValueError("a YAML JOBS file is a list of jobs"))]
        seen: set[int] = set()
        return [(item.start_mark.line + 1, ValueError(_ALIAS) if _shares_nodes(item, seen) else yaml.safe_load(yaml.serialize(item)))
                for item in node.value]
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                entries.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                entries.append((number, ValueError(f"not valid JSON: {error.msg} at column {error.colno}")))
    return entries


def read_jobs(path: Path | str) -> JobList:
    """The jobs of a JOBS file and, by line number, the lines that are not jobs (a duplicate id included)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JOBS file at {path}")
    result, seen = JobList(), {}
    for line, entry in _entries(path):
        try:
            if isinstance(entry, Exception):
                raise entry
            job = _job(entry, line)
        except ValueError as error:
            result.problems.append(Problem(line, bounded(str(error))))
            continue
        if job.id in seen:
            result.problems.append(Problem(line, f"id {job.id!r} repeats line {seen[job.id]}; give each job its own id", job.id))
            continue
        seen[job.id] = line
        result.jobs.append(job)
    return result
