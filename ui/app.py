"""`xattn ui`: a Gradio app for the whole loop on one model: inspect attention, edit, edit a real
image, compose, erase.

Every handler is a plain function of the loaded pipeline; the app wires them to the page. One job
runs at a time (all events share one queue slot: they use the same weights), bad input comes back
as a message in the page, uploads are read only as images, and the server listens on 127.0.0.1
unless told otherwise.
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import shutil
import tempfile
import weakref
from pathlib import Path

import gradio as gr
import numpy as np
from gradio.utils import _parse_file_size
from PIL import Image, ImageOps

from pipelines.edit import blend_for, choose_edit, describe, parse_window, prompt_to_prompt
from pipelines.erasure import load_erasure
from pipelines.flowedit import flow_edit, settings_for
from pipelines.generate import GenerationSettings, check_size, generate
from pipelines.guidance import compose
from pipelines.images import read_image
from pipelines.inversion import METHODS as INVERSIONS
from pipelines.inversion import invert
from pipelines.loading import load_pipeline, model_label
from pipelines.messages import bounded
from pipelines.unlearn import METHODS as ERASERS
from pipelines.unlearn import UnlearnSettings, erase, template_prompts
from xattn import trace
from xattn.heatmap import grid, overlay
from xattn.families import cross_resolutions
from xattn.tokens import pipeline_tokenizer, prompt_words

MAX_WEIGHTS = 12
UPLOAD_LIMIT = "8mb"
UPLOAD_BYTES = _parse_file_size(UPLOAD_LIMIT)
EDIT_MODES = ["auto", "replace", "refine", "reweight"]


def readable(handler):
    """Bad input (ValueError, a missing file) becomes a message in the page instead of a stack trace."""

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except (ValueError, OSError) as error:
            raise gr.Error(bounded(str(error)), print_exception=False) from None

    return wrapped


def whole(value: float, name: str) -> int:
    """A whole number from a number field; NaN, inf or a fraction is a message naming the field."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value == int(value)):
        raise ValueError(f"{name} must be a whole number; got {value}")
    return int(value)


def read_payload(payload) -> Image.Image | None:
    """An image input's payload read within the app's limits however it arrives: an upload (Gradio's `max_file_size`
    stops it first) or inline as a `data:` URL in an API call, which Gradio would decode unchecked. Bytes are counted
    before decoding, pixels before unpacking (`pipelines.images.read_image`), and a refusal is the app's own message."""
    if payload is None:
        return None
    inline = bool(payload.url and payload.url.startswith("data:"))
    encoded = payload.url.partition(",")[2] if inline else ""
    if (len(encoded) * 3 // 4 if inline else Path(payload.path).stat().st_size) > UPLOAD_BYTES:
        raise gr.Error(f"the image is over the app's {UPLOAD_LIMIT} limit; send a smaller file", print_exception=False)
    try:
        source = base64.b64decode(encoded, validate=True) if inline else Path(payload.path)
    except binascii.Error:
        raise gr.Error("the image's data: URL is not valid base64", print_exception=False) from None
    try:
        return ImageOps.exif_transpose(read_image(source))
    except ValueError as error:
        raise gr.Error(bounded(str(error)), print_exception=False) from None


def checked_image(**options) -> gr.Image:
    """A PIL image input read by `read_payload`. (Set on the instance: a subclass of a Gradio component makes Gradio
    write a .pyi stub beside this module at import.)"""
    image = gr.Image(type="pil", **options)
    image.preprocess = read_payload
    return image


def words_of(pipe, prompt: str) -> list[str]:
    """The prompt's distinct words, in order (what maps, weights and concepts are offered for)."""
    return list(dict.fromkeys(w.text for w in prompt_words(pipeline_tokenizer(pipe), prompt or "") if w.tokens))


def _gallery(image: Image.Image, maps: dict[str, np.ndarray], label: str = "") -> list[tuple[Image.Image, str]]:
    return [(overlay(image, heat).resize((256, 256), Image.Resampling.NEAREST), label + word) for word, heat in maps.items()]


def _big(image: Image.Image) -> Image.Image:
    return image.resize((256, 256), Image.Resampling.NEAREST) if image.size[0] < 256 else image


class Handlers:
    """The app's work on one pipeline; each method is one button's event. Each takes Gradio's `progress`, which
    turns the pipeline's own tqdm bars (one tick per denoising or training step) into the page's progress bar."""

    def __init__(self, pipe, model: str) -> None:
        self.pipe, self.model = pipe, model
        self.side = check_size(pipe, None)
        self.downloads = Path(tempfile.mkdtemp(prefix="xattn-app-"))  # the erasure files offered for download, one per name
        weakref.finalize(self, shutil.rmtree, self.downloads, True)

    def resolutions(self) -> list[int]:
        return cross_resolutions(self.pipe, (self.side // self.pipe.vae_scale_factor,) * 2)

    def inspect(self, prompt: str, seed: float, steps: float, guidance: float, resolutions: list[int], first: float, last: float,
                progress=gr.Progress(track_tqdm=True)):
        """The image and one heat map per word, over the chosen resolutions and steps [first, last]."""
        if not (prompt or "").strip():
            raise ValueError("type a prompt first")
        if not resolutions:
            raise ValueError("tick at least one resolution")
        steps, first, last = whole(steps, "steps"), whole(first, "first"), whole(last, "last")
        if not 1 <= first <= last <= steps:
            raise ValueError(f"the step range must lie within 1..{steps} with first <= last; got {first}..{last}")
        settings = GenerationSettings(prompt, seed=whole(seed, "seed"), steps=steps, guidance=guidance)
        with trace(self.pipe, per_step=True) as tc:
            (image,) = generate(self.pipe, settings)
        maps = tc.word_maps(resolutions=[int(r) for r in resolutions], steps=(first - 1, last))
        return _big(image), _gallery(image, maps)

    def edit(self, source: str, target: str, mode: str, weights: dict[str, float], blend: str, cross: str, self_steps: str,
             seed: float, steps: float, guidance: float, inversion=None, progress=gr.Progress(track_tqdm=True)):
        """Prompt-to-Prompt from SOURCE (or a real image's inversion) to TARGET: side by side, and both images' word
        maps as the edit drew them (the target's are the maps injected from the source, where the edit injects)."""
        if not (source or "").strip() or not (target or "").strip():
            raise ValueError("give both a source and a target prompt")
        weights = {w: s for w, s in weights.items() if s != 1.0}
        edit = choose_edit(pipeline_tokenizer(self.pipe), source, target, mode, weights)
        blend_words = [w.strip() for w in (blend or "").split(",") if w.strip()]
        spec = blend_for(pipeline_tokenizer(self.pipe), source, target, blend_words) if blend_words else None
        result = prompt_to_prompt(self.pipe, [source, target], edit, cross_steps=parse_window(cross),
                                  self_steps=parse_window(self_steps), blend=spec, steps=whole(steps, "steps"), guidance=guidance,
                                  seed=whole(seed, "seed"), inversion=inversion, maps=True)
        first, second = result.images
        shown = [first, second] if inversion is None else [inversion.image, first, second]
        labels = ["source", "target"] if inversion is None else ["input", "redrawn", "edited"]
        sheet = grid(shown, labels, columns=len(shown), scale=max(1, 256 // first.size[0]))
        gallery = _gallery(first, result.maps.word_maps(image=0), "source: ") + _gallery(second, result.maps.word_maps(image=1), "target: ")
        return sheet, gallery, f"edit: {describe(edit)}"

    def real_image(self, image: Image.Image | None, caption: str, method: str, nouns: str, target: str, mode: str,
                   weights: dict[str, float], blend: str, cross: str, self_steps: str, steps: float, guidance: float,
                   progress=gr.Progress(track_tqdm=True)):
        """Invert the upload under its caption (dpl: learning the named nouns' tokens), then edit it like a generated source;
        or, method "flowedit" on a flow model, edit it with no inversion (FlowEdit, the authors' settings)."""
        if image is None:
            raise ValueError("upload an image first")
        if not (caption or "").strip():
            raise ValueError("describe the image in the caption, in the model's words")
        if method == "flowedit":
            settings = settings_for(self.pipe)
            fitted, edited = flow_edit(self.pipe, image, caption, target, settings=settings).images
            sheet = grid([fitted, edited], ["input", "edited"], columns=2, scale=max(1, 256 // fitted.size[0]))
            return sheet, [], (f"edit: FlowEdit, the authors' settings ({settings.steps} levels, the last {settings.n_max} edited, "
                               f"guidance {settings.source_guidance:g} / {settings.target_guidance:g}); mode, blend, windows, steps "
                               "and guidance here do not apply, and it draws no maps")
        named = [w.strip() for w in (nouns or "").split(",") if w.strip()]
        inversion = invert(self.pipe, image, caption, method=method, steps=whole(steps, "steps"), guidance=guidance, nouns=named,
                           cache_dir=None)
        return self.edit(caption, target, mode, weights, blend, cross, self_steps, 0, steps, guidance, inversion=inversion)

    def compose(self, prompt: str, concepts: list[str], method: str, seed: float, steps: float, guidance: float,
                progress=gr.Progress(track_tqdm=True)):
        """The guided image next to plain generation from the same noise, with each concept's map."""
        if not concepts:
            raise ValueError("tick at least one concept (a word of the prompt)")
        sampling = {"seed": whole(seed, "seed"), "steps": whole(steps, "steps"), "guidance": guidance}
        plain = compose(self.pipe, prompt, concepts, method="none", **sampling)
        guided = compose(self.pipe, prompt, concepts, method=method, **sampling)
        sheet = grid([plain.images[0], guided.images[0]], ["plain", method], columns=2, scale=max(1, 256 // self.side))
        return sheet, _gallery(guided.images[0], guided.maps(0, size=guided.images[0].size[::-1]))

    def erase(self, concept: str, method: str, guide: str, preserve: str, steps: float, prompts: str, seed: float,
              progress=gr.Progress(track_tqdm=True)):
        """Erase the concept; before and after grids of the comparison prompts, and the erasure file to download."""
        if not (concept or "").strip():
            raise ValueError("name the concept to erase, e.g. circle")
        seed = whole(seed, "seed")
        kept = [w.strip() for w in (preserve or "").split(",") if w.strip()]
        shown = [p.strip() for p in (prompts or "").split(";") if p.strip()] or [f"a {concept}"]
        settings = UnlearnSettings(method=method, concept=concept.strip(), guide=(guide or "").strip(),
                                   preserve=template_prompts(kept), steps=whole(steps, "steps"), seed=seed)
        before = [generate(self.pipe, GenerationSettings(p, seed=seed))[0] for p in shown]
        with tempfile.TemporaryDirectory(prefix="xattn-erase-") as work:  # the trainer's checkpoint goes with it
            made = erase(self.pipe, settings, work, self.model)
            path = Path(shutil.copy2(made, self.downloads / made.name))
        with load_erasure(self.pipe, path):
            after = [generate(self.pipe, GenerationSettings(p, seed=seed))[0] for p in shown]
        scale = max(1, 128 // self.side)
        return (grid(before, shown, columns=len(shown), scale=scale), grid(after, shown, columns=len(shown), scale=scale), str(path))


def _sampling() -> tuple[gr.Slider, gr.Slider]:
    """Steps and guidance sliders."""
    return gr.Slider(1, 100, value=25, step=1, label="Steps"), gr.Slider(1.0, 15.0, value=5.0, step=0.5, label="Guidance")


def _edit_options() -> tuple[gr.Dropdown, gr.Textbox, gr.Textbox, gr.Textbox]:
    """Mode, blend words, cross- and self-attention injection windows."""
    return (gr.Dropdown(EDIT_MODES, value="auto", label="Mode"),
            gr.Textbox(label="Blend words (comma-separated; empty: no local blending)"),
            gr.Textbox(label="Cross-attention steps", value="0.8"), gr.Textbox(label="Self-attention steps", value="0.4"))


def _edit_results(button: str, name: str, sheet: str, maps: str) -> tuple[gr.Button, gr.Markdown, gr.Image, gr.Gallery]:
    """The run button, the line naming the edit, the side-by-side sheet and the maps gallery."""
    run = gr.Button(button, variant="primary", elem_id=f"{name}-run")
    note = gr.Markdown()
    with gr.Row():
        return run, note, gr.Image(label=sheet, type="pil", elem_id=f"{name}-result"), gr.Gallery(label=maps, columns=4)


def _weight_row(pipe, target: gr.Textbox) -> list[gr.Slider]:
    """One weight slider per word of the target, rebuilt whenever the target changes."""
    gr.Markdown("Word weights (1 leaves a word as it is)")
    with gr.Row():
        sliders = [gr.Slider(0.0, 3.0, value=1.0, step=0.1, visible=False, label=f"word {i + 1}") for i in range(MAX_WEIGHTS)]
    target.change(functools.partial(_show_weights, pipe), target, sliders, api_name="weights", api_visibility="private")
    return sliders


def _show_weights(pipe, target: str) -> list:
    """One visible slider per word of the target, labelled with it; the rest hidden."""
    words = words_of(pipe, target)[:MAX_WEIGHTS]
    return [gr.update(visible=i < len(words), label=words[i] if i < len(words) else "", value=1.0) for i in range(MAX_WEIGHTS)]


def _weights(pipe, target: str, values: tuple[float, ...]) -> dict[str, float]:
    return dict(zip(words_of(pipe, target)[:MAX_WEIGHTS], values))


def build_app(pipe, model: str = "embedded") -> gr.Blocks:
    """The Blocks app on a loaded pipeline."""
    work = Handlers(pipe, model)
    one_job = {"concurrency_limit": 1, "concurrency_id": "model"}
    with gr.Blocks(title="xattn") as app:
        gr.Markdown(f"# xattn: see and steer cross-attention\nModel: `{model}`")
        with gr.Tab("Inspect"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", value="a red circle and a blue square", elem_id="inspect-prompt")
                seed = gr.Number(label="Seed", value=0, precision=0)
            with gr.Row():
                steps, guidance = _sampling()
            with gr.Row():
                sides = work.resolutions()
                resolutions = gr.CheckboxGroup(sides, value=sides, label="Resolutions (query grid side)")
                first = gr.Slider(1, 100, value=1, step=1, label="First step")
                last = gr.Slider(1, 100, value=25, step=1, label="Last step")
            run = gr.Button("Generate", variant="primary", elem_id="inspect-run")
            with gr.Row():
                image = gr.Image(label="Image", type="pil", elem_id="inspect-image")
                maps = gr.Gallery(label="Heat maps per word", columns=4, elem_id="inspect-maps")
            run.click(readable(work.inspect), [prompt, seed, steps, guidance, resolutions, first, last], [image, maps],
                      api_name="inspect", **one_job)

        with gr.Tab("Edit"):
            with gr.Row():
                source = gr.Textbox(label="Source prompt", value="a red circle")
                target = gr.Textbox(label="Target prompt", value="a red square")
            with gr.Row():
                mode, blend, cross, self_window = _edit_options()
            with gr.Row():
                edit_seed = gr.Number(label="Seed", value=0, precision=0)
                edit_steps, edit_guidance = _sampling()
            sliders = _weight_row(pipe, target)
            edit_run, edit_note, side_by_side, edit_maps = _edit_results("Edit", "edit", "Side by side",
                                                                         "Heat maps as the edit drew them (source, then target)")

            def do_edit(source, target, mode, blend, cross, self_window, seed, steps, guidance, *values,
                        progress=gr.Progress(track_tqdm=True)):
                weights = _weights(pipe, target, values)
                return readable(work.edit)(source, target, mode, weights, blend, cross, self_window, seed, steps, guidance)

            app.load(functools.partial(_show_weights, pipe), target, sliders, api_name="weights", api_visibility="private")
            edit_run.click(do_edit, [source, target, mode, blend, cross, self_window, edit_seed, edit_steps, edit_guidance, *sliders],
                           [side_by_side, edit_maps, edit_note], api_name="edit", **one_job)

        with gr.Tab("Real image"):
            with gr.Row():
                upload = checked_image(label="Image (PNG, JPEG, ...)", sources=["upload"], height=256, elem_id="real-upload")
                with gr.Column():
                    caption = gr.Textbox(label="Caption (what the image shows)", elem_id="real-caption")
                    method = gr.Dropdown([*INVERSIONS, "flowedit"], value="direct", label="Inversion (flowedit: none, on SD3/Flux)")
                    nouns = gr.Textbox(label="Nouns of the caption's objects (dpl; comma-separated)")
                    real_target = gr.Textbox(label="Target prompt", elem_id="real-target")
                    real_mode, real_blend, real_cross, real_self = _edit_options()
            with gr.Row():
                real_steps, real_guidance = _sampling()
            real_sliders = _weight_row(pipe, real_target)
            real_run, real_note, real_sheet, real_maps = _edit_results("Invert and edit", "real", "Input, redrawn, edited",
                                                                       "Heat maps as the edit drew them (redrawn input, then edited)")

            def do_real(image, caption, method, nouns, target, mode, blend, cross, self_window, steps, guidance, *values,
                        progress=gr.Progress(track_tqdm=True)):
                weights = _weights(pipe, target, values)
                return readable(work.real_image)(image, caption, method, nouns, target, mode, weights, blend, cross, self_window, steps,
                                                 guidance)

            real_run.click(do_real, [upload, caption, method, nouns, real_target, real_mode, real_blend, real_cross, real_self, real_steps,
                                     real_guidance, *real_sliders], [real_sheet, real_maps, real_note], api_name="real_image", **one_job)

        with gr.Tab("Compose"):
            with gr.Row():
                compose_prompt = gr.Textbox(label="Prompt", value="a blue circle, a red triangle and a green square")
                compose_method = gr.Dropdown(["astar", "attend-excite"], value="astar", label="Method")
            concepts = gr.CheckboxGroup(words_of(pipe, "a blue circle, a red triangle and a green square"),
                                        value=["circle", "triangle", "square"], label="Concepts (words of the prompt)")
            with gr.Row():
                compose_seed = gr.Number(label="Seed", value=0, precision=0)
                compose_steps, compose_guidance = _sampling()
            compose_run = gr.Button("Compose", variant="primary", elem_id="compose-run")
            with gr.Row():
                compose_sheet = gr.Image(label="Plain generation and guided, same noise", type="pil", elem_id="compose-result")
                compose_maps = gr.Gallery(label="Each concept's map", columns=4)
            compose_prompt.change(lambda p: gr.update(choices=words_of(pipe, p), value=[]), compose_prompt, concepts,
                                  api_name="concepts", api_visibility="private")
            compose_run.click(readable(work.compose), [compose_prompt, concepts, compose_method, compose_seed, compose_steps,
                                                       compose_guidance], [compose_sheet, compose_maps], api_name="compose", **one_job)

        with gr.Tab("Erase"):
            with gr.Row():
                concept = gr.Textbox(label="Concept to erase", value="circle")
                erase_method = gr.Dropdown(list(ERASERS), value="uce", label="Method")
                guide = gr.Textbox(label="Guide (what it turns into; empty: nothing)", value="square")
            with gr.Row():
                preserve = gr.Textbox(label="Preserve (comma-separated words; uce and salun)", value="square,triangle")
                erase_steps = gr.Slider(0, 1000, value=0, step=1, label="Steps (0: the method's default)")
                erase_seed = gr.Number(label="Seed", value=0, precision=0)
            shown = gr.Textbox(label="Prompts to compare (separated by ;)", value="a red circle; a blue circle; a green triangle")
            erase_run = gr.Button("Erase", variant="primary", elem_id="erase-run")
            with gr.Row():
                before = gr.Image(label="Before", type="pil")
                after = gr.Image(label="After", type="pil")
            download = gr.File(label="Erasure file (safetensors)", elem_id="erase-file")
            erase_run.click(readable(work.erase), [concept, erase_method, guide, preserve, erase_steps, shown, erase_seed],
                            [before, after, download], api_name="erase", **one_job)
    return app


def launch(host: str = "127.0.0.1", port: int | None = None, model: str | None = None, block: bool = True) -> gr.Blocks:
    """Load the model and serve the app (one queued job at a time; uploads up to UPLOAD_LIMIT). The pipeline's
    own tqdm bars (one tick per denoising or training step) drive the page's progress bars."""
    pipe = load_pipeline(model)
    app = build_app(pipe, model_label(model))
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, max_file_size=UPLOAD_LIMIT, prevent_thread_lock=not block, show_error=True)
    return app
