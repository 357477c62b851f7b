"""Install a controller in every attention layer of a denoiser (a UNet or a transformer) for the length of a `with` block.

    with attach(pipe, controller) as state:
        pipe(prompt)

Each layer's processor is replaced by one that computes what it computed (plain, sliced, xformers
or fused projections; an IP-Adapter's image attention kept; SD3's and Flux's joint attention) plus
the controller; a processor class xattn does not know is refused by name before anything changes,
and so is a controller that does not understand joint attention on a denoiser that has it. On exit,
normal or by an exception, the denoiser gets back the very processor objects it had, its hook is
removed, and the pipeline's `encode_prompt` is its own again. A `torch.compile`d denoiser is
attached through the module it wraps, so layers keep their diffusers names.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager

from xattn.controller import Controller
from xattn.denoiser import called_denoiser, denoiser
from xattn.families import Call, family_of
from xattn.sites import BatchLayout, query_resolution

_ATTACHED = "_xattn_attached"

class CallState:
    """What the processors share about the current denoiser call: latent size, token grid, text length, step, batch layout.

    The step advances when the denoiser is called with a new timestep (so several calls at one
    timestep, as guidance losses make, stay one step) and restarts at 0 when a pipeline encodes
    its prompt, i.e. at each pipeline call. `set_step` fixes it explicitly for custom loops.
    """

    def __init__(self, family, model) -> None:
        self.family, self.model = family, model
        self.call = Call((0, 0), None, 0, 0.0)
        self.step = -1
        self.layout = BatchLayout(prompts=(), guidance=False)
        self.encoded = False
        self._timestep: float | None = None
        self._fixed = False

    def set_step(self, step: int) -> None:
        self.step, self._fixed = step, True

    def restart(self, layout: BatchLayout) -> None:
        self.step, self._timestep, self._fixed = -1, None, False
        self.layout, self.encoded = layout, True

    @contextmanager
    def conditional_calls(self) -> Iterator[None]:
        """UNet calls inside the block run conditional rows only, whatever the pipeline's layout
        (a guidance loss's extra pass, on any subset of the images)."""
        layout = self.layout
        self.layout = BatchLayout(layout.prompts, layout.images_per_prompt, guidance=False)
        try:
            yield
        finally:
            self.layout = layout

    @property
    def latent(self) -> tuple[int, int]:
        return self.call.latent

    @property
    def rows(self) -> int:
        return self.call.rows

    def grid(self, queries: int) -> tuple[int, int]:
        """The (h, w) grid of `queries` image tokens in the current call: a UNet level's, or the transformer's tokens."""
        if self.call.grid is None:
            return query_resolution(self.call.latent, queries)
        if self.call.grid[0] * self.call.grid[1] != queries:
            raise ValueError(f"{queries} image tokens do not fill the {self.call.grid[0]}x{self.call.grid[1]} token grid of this call")
        return self.call.grid

    def before_call(self, module, args, kwargs) -> None:
        self.call = self.family.read_call(self.model, args, kwargs)
        if not self._fixed and self.call.timestep != self._timestep:
            self.step += 1
            self._timestep = self.call.timestep


def _layout_from_encode_prompt(signature: inspect.Signature, args, kwargs) -> BatchLayout:
    bound = signature.bind_partial(*args, **kwargs).arguments
    prompt = bound.get("prompt")
    if prompt is None:  # prompt_embeds: the words are unknown
        embeds = bound.get("prompt_embeds")
        prompts = (None,) * (embeds.shape[0] if embeds is not None else 1)
    else:
        prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
    # a pipeline whose encode_prompt takes no do_classifier_free_guidance (Flux) runs the denoiser on conditional rows only
    guided = bool(bound.get("do_classifier_free_guidance", "do_classifier_free_guidance" in signature.parameters))
    return BatchLayout(prompts, int(bound.get("num_images_per_prompt") or 1), guided)


def _attention_modules(model) -> dict:
    """The denoiser's attention modules under the keys of `attn_processors`, found in one walk of
    the model (reading `attn_processors`, then installing and restoring with `set_attn_processor`,
    walks it five times: a few milliseconds per `with` block)."""
    return {f"{name}.processor": module for name, module in model.named_modules() if hasattr(module, "get_processor")}


@contextmanager
def attach(target, controller: Controller) -> Iterator[CallState]:
    """Attach `controller` to every attention layer of `target` (a diffusers pipeline, or its UNet or transformer)."""
    called = called_denoiser(target)
    model = denoiser(target)
    family = family_of(model)
    if family.joint and not controller.joint:
        raise TypeError(f"{type(controller).__name__} works on cross-attention layers; {type(model).__name__} has joint "
                        "(MM-DiT) attention, which it does not handle yet. Attention maps (xattn.trace) and Prompt-to-Prompt work there")
    if getattr(model, _ATTACHED, False):
        raise RuntimeError("a controller is already attached to this denoiser; leave the first `with attach(...)` block before attaching another")
    layers = _attention_modules(model)
    original = {key: module.processor for key, module in layers.items()}
    state = CallState(family, model)
    replacements = {key: family.processor(key, processor, controller, state) for key, processor in original.items()}
    encode = getattr(target, "encode_prompt", None) if target is not called and target is not model else None
    hook = called.register_forward_pre_hook(state.before_call, with_kwargs=True)
    try:
        for key, module in layers.items():
            module.set_processor(replacements[key])
        setattr(model, _ATTACHED, True)
        if encode is not None:
            signature = inspect.signature(encode)

            separate_negative = "do_classifier_free_guidance" not in signature.parameters

            @functools.wraps(encode)
            def encode_prompt(*args, **kwargs):
                if separate_negative and state.encoded and state.step == -1:
                    raise ValueError(f"{type(target).__name__} encoded a second (negative) prompt for true classifier-free "
                                     "guidance, whose separate denoiser calls xattn cannot tell from the prompt's yet: "
                                     "leave out negative_prompt / true_cfg_scale while attached")
                state.restart(_layout_from_encode_prompt(signature, args, kwargs))
                return encode(*args, **kwargs)

            target.encode_prompt = encode_prompt
        yield state
    finally:
        for key, module in layers.items():
            module.set_processor(original[key])
        hook.remove()
        if hasattr(model, _ATTACHED):
            delattr(model, _ATTACHED)
        if "encode_prompt" in vars(target):
            del target.encode_prompt
