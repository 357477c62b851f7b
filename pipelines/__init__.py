"""Diffusers pipelines: loading, generation, and (later) editing, inversion, guidance, unlearning."""
