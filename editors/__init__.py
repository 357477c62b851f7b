"""Attention edits (Prompt-to-Prompt and relatives); arrive with their issues."""
