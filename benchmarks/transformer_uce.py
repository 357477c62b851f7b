"""UCE on tiny random SD3, Flux and PixArt pipelines (issue 31): how far the concept moves toward the guide, and how
far the preserved prompts move.

    python -m benchmarks.transformer_uce

SD3 and Flux: relative distance between the model's velocities for two prompts, one noise latent, timestep 500
(`tests/test_transformer_erasure.py`'s settings). PixArt: relative distance between the cross-attention keys of "a red
circle" from the concept on and those of "a red square" (`tests/test_dit.py`'s settings).
"""

from __future__ import annotations

from pipelines.erasure import apply_erasure
from pipelines.unlearn import UnlearnSettings, unlearn
from tests.architectures import TRANSFORMERS
from tests.test_dit import keys
from tests.test_transformer_erasure import SETTINGS, apart, velocity
from xattn.tokens import pipeline_word_tokens


def main() -> None:
    for name in ("sd3", "flux"):
        pipe = TRANSFORMERS[name]()
        prompts = ("a red circle", "a red square", "a blue triangle")
        before = {q: velocity(pipe, q) for q in prompts}
        with apply_erasure(pipe, unlearn(pipe, SETTINGS).tensors):
            after = {q: velocity(pipe, q) for q in prompts}
        print(f"{name}: circle to square before {apart(before[prompts[0]], before[prompts[1]]):.4f}, after "
              f"{apart(after[prompts[0]], after[prompts[1]]):.4f}; triangle moved {apart(after[prompts[2]], before[prompts[2]]):.4f}, "
              f"square moved {apart(after[prompts[1]], before[prompts[1]]):.4f}")
    pipe = TRANSFORMERS["pixart"]()
    settings = UnlearnSettings(method="uce", concept="circle", guide="square", contexts=("a red circle",), preserve=("a blue triangle",))
    circle = pipeline_word_tokens(pipe, "a red circle", "circle")[0]
    square, triangle, concept = keys(pipe, "a red square")[:, :, circle:], keys(pipe, "a blue triangle"), keys(pipe, "a red circle")
    with apply_erasure(pipe, unlearn(pipe, settings).tensors):
        erased, kept = keys(pipe, "a red circle")[:, :, circle:], keys(pipe, "a blue triangle")
    print(f"pixart: circle keys to square's before {apart(concept[:, :, circle:], square):.3f}, after {apart(erased, square):.3f}; "
          f"triangle moved {apart(kept, triangle):.3f}")


if __name__ == "__main__":
    main()
