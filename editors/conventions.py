"""Where xattn's Prompt-to-Prompt may depart from google/prompt-to-prompt's code: each departure a switch.

- self_limit: the largest self-attention query grid side that is injected. google: 16 at any
  image size (16 and 8 at 512 px on SD 1.x); None: a quarter of the latent's longer side, which
  is the same 16 at 512 px and follows the image size, or, on a denoiser with no self-attention that
  coarse (a DiT's layers all work at its patch grid), its coarsest self-attention grid.
- window_rows: fractions of the cross-attention windows count over `steps + 1` rows (google: its
  table has a row per PNDM call, 51 for 50 steps, so 0.8 of 25 steps is int(0.8 * 26) = 20) or
  over `steps`. Self-attention windows count over `steps` in both.
- refine_tail: a refinement's padding after the end-of-text token maps "from each end" (a target
  token k places after its end-of-text reads the source token k places after the source's) or
  "by position" (google: target token t reads source token t).

`GOOGLE` reproduces the reference (and the diffusers community pipeline, which copies it). The
default, `XATTN`, keeps a departure only where benchmarks.p2p_conventions measured it better
(benchmarks/RESULTS.md, issue 26). It keeps the self-attention limit that follows the latent
(refinement 85 % exact against google's 67 %, both with google's tail; swaps within one image of
48) and takes google's windows (equal on every row: at the default 0.8 both give 20 of 25 steps)
and google's refinement tail (85 % exact against 75 %, the kept object's IoU 0.88 against 0.67). google's word-swap mapper also maps
the tokens after the last swapped word by position; that differs from xattn's only when a swapped
word changes the token count, and is not reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Conventions:
    self_limit: int | None = None
    window_rows: str = "steps + 1"
    refine_tail: str = "by position"

    def __post_init__(self) -> None:
        if self.window_rows not in ("steps", "steps + 1"):
            raise ValueError(f"window_rows is 'steps' or 'steps + 1'; got {self.window_rows!r}")
        if self.refine_tail not in ("from each end", "by position"):
            raise ValueError(f"refine_tail is 'from each end' or 'by position'; got {self.refine_tail!r}")
        if self.self_limit is not None and self.self_limit < 1:
            raise ValueError(f"self_limit is a query grid side of at least 1, or None; got {self.self_limit}")

    def self_side(self, latent: tuple[int, int], coarsest: int) -> int:
        """The largest self-attention query grid side injected at this latent size, on a denoiser whose coarsest
        self-attention grid has side `coarsest`."""
        return self.self_limit if self.self_limit is not None else max(1, max(latent) // 4, coarsest)

    def window_span(self, steps: int) -> int:
        """What fractions of a cross-attention window are fractions of."""
        return steps + 1 if self.window_rows == "steps + 1" else steps


XATTN = Conventions()
GOOGLE = Conventions(self_limit=16)
