"""xattn: record, visualise and rewrite cross-attention in diffusers text-to-image models."""

from xattn.attach import CallState, attach
from xattn.capture import MapCapture
from xattn.controller import Controller, explicit_probs
from xattn.sites import BatchLayout, Layer, Site
from xattn.store import AttentionStore
from xattn.tokens import pipeline_word_tokens, prompt_words, word_tokens
from xattn.trace import Trace, trace

__version__ = "0.1.0"

__all__ = [
    "AttentionStore",
    "BatchLayout",
    "CallState",
    "Controller",
    "Layer",
    "MapCapture",
    "Site",
    "Trace",
    "attach",
    "explicit_probs",
    "pipeline_word_tokens",
    "prompt_words",
    "trace",
    "word_tokens",
]
