"""Attention edits: Prompt-to-Prompt's word swap, refinement, re-weighting, schedules and local blending."""

from editors.blend import LocalBlend
from editors.p2p import PromptToPrompt
from editors.specs import Refine, Reweight, Swap, auto_edit

__all__ = ["LocalBlend", "PromptToPrompt", "Refine", "Reweight", "Swap", "auto_edit"]
