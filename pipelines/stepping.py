"""Which UNet calls of a pipeline's sampling loop begin its denoising steps, for any diffusers scheduler.

Most schedulers call the UNet once per step. Heun calls it twice at each timestep after the
first, and PNDM twice at its second: the first of the two evaluates a point the previous step
predicted, and the step that follows starts from the latents passed to the second. Guidance
updates and local blending act on the latents a step starts from, so they act after the call
before such a starting call (the pipeline's `callback_on_step_end` runs after every call), never
on a predicted point the scheduler discards.
"""

from __future__ import annotations

import copy
import inspect
from xattn.sites import denoising_steps


class Calls:
    """The timestep of each UNet call of a sampling loop and the denoising step it belongs to."""

    def __init__(self, timesteps) -> None:
        self.timesteps = tuple(float(t) for t in timesteps)
        self.steps = tuple(denoising_steps(self.timesteps))

    @classmethod
    def planned(cls, scheduler, steps: int, strength: float = 1.0) -> Calls:
        """The calls of `steps` steps with `scheduler` (read from a copy: the scheduler keeps its state); an
        img2img pipeline runs only the last `strength` of them, as diffusers' `get_timesteps` cuts them. A flow-matching
        scheduler that shifts its noise levels by the image size (Flux's) is probed unshifted: the shift moves the levels,
        not their count or which calls share one."""
        probe = copy.deepcopy(scheduler)
        probe.set_timesteps(steps, **({"mu": 0.0} if getattr(probe.config, "use_dynamic_shifting", False) else {}))
        start = steps - min(int(steps * strength), steps)
        timesteps = probe.timesteps[start * probe.order :]
        if len(timesteps) == 0:
            raise ValueError(f"strength {strength} of {steps} steps runs no step; raise strength or steps")
        return cls(timesteps)

    @classmethod
    def of_pipeline(cls, pipe, steps: int, call_options: dict) -> Calls:
        """The calls `pipe(..., num_inference_steps=steps, **call_options)` makes."""
        params = inspect.signature(pipe.__call__).parameters
        strength = call_options.get("strength", params["strength"].default) if "strength" in params else 1.0
        return cls.planned(pipe.scheduler, steps, strength)

    @property
    def count(self) -> int:
        """How many denoising steps (noise levels) the loop visits."""
        return self.steps[-1] + 1

    def begins(self, call: int) -> bool:
        """Whether the step of `call` starts from the latents passed to it (its last call)."""
        return call + 1 == len(self.steps) or self.steps[call + 1] != self.steps[call]

    def settles(self, call: int) -> bool:
        """Whether the latents after `call` are a step's state: the next call begins a step, or the loop ends."""
        return call + 1 == len(self.steps) or self.begins(call + 1)


def with_callback(pipe, call_options: dict, ours, inputs: list[str]) -> dict:
    """The pipeline call's options with `ours` as its step-end callback, followed by the caller's own if they gave
    one (it sees the tensors as ours left them), and the tensor inputs both need.

    A pipeline with only diffusers' older `callback(step, timestep, latents)` (PixArt-alpha's, which would ignore
    `callback_on_step_end` without a word) gets ours there, changing the latents in place."""
    options = dict(call_options)
    params = inspect.signature(pipe.__call__).parameters
    if "callback_on_step_end" not in params:
        return _with_legacy_callback(pipe, options, ours, "callback" in params)
    theirs = options.pop("callback_on_step_end", None)
    wanted = list(dict.fromkeys([*inputs, *options.pop("callback_on_step_end_tensor_inputs", [])]))
    if theirs is None:
        return options | {"callback_on_step_end": ours, "callback_on_step_end_tensor_inputs": wanted}

    def both(pipeline, call, timestep, tensors):
        changed = ours(pipeline, call, timestep, tensors) if ours is not None else {}
        return changed | (theirs(pipeline, call, timestep, tensors | changed) or {})

    return options | {"callback_on_step_end": both, "callback_on_step_end_tensor_inputs": wanted}


def _with_legacy_callback(pipe, options: dict, ours, has_callback: bool) -> dict:
    name = type(pipe).__name__
    if "callback_on_step_end" in options:
        raise ValueError(f"{name} takes no callback_on_step_end (it would ignore it); pass callback=fn(step, timestep, latents)")
    if ours is None:
        return options
    if not has_callback:
        raise TypeError(f"{name} takes no step callback, so xattn cannot act between its steps (local blending, inversion)")
    if options.get("callback_steps", 1) != 1 or pipe.scheduler.order != 1:
        raise ValueError(f"{name} calls its step callback only every few denoiser calls (callback_steps, or a scheduler "
                         "of order > 1); leave callback_steps at 1 and use a first-order scheduler")
    theirs = options.pop("callback", None)

    def legacy(call: int, timestep, latents) -> None:
        changed = ours(pipe, call, timestep, {"latents": latents})
        if set(changed) - {"latents"}:
            raise ValueError(f"{name}'s step callback can change only the latents, not {sorted(set(changed) - {'latents'})}")
        if "latents" in changed:
            latents.copy_(changed["latents"])
        if theirs is not None:
            theirs(call, timestep, latents)

    return options | {"callback": legacy}
