"""The one error type of the GGUF package."""

from __future__ import annotations


class GGUFError(ValueError):
    """A GGUF file that Tandem cannot use; the message says what is wrong and what to do."""
