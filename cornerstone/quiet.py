"""Silence third-party progress output while cornerstone shows its own (one status line or bar)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def no_tqdm() -> Iterator[None]:
    """Silence every tqdm bar drawn inside the block (lm-eval's model loop draws one per call, 60 per
    sweep; transformers' GGUF dequantisation one per load), neither of which takes a ``disable`` flag:
    the class default is switched for the duration and restored afterwards."""
    import tqdm

    original_init = tqdm.tqdm.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        original_init(self, *args, **kwargs)

    tqdm.tqdm.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        tqdm.tqdm.__init__ = original_init  # type: ignore[method-assign]


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' own bars (loading, saving shards) and plain tqdm bars are off inside the block;
    cornerstone's CLI shows one status line instead."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with no_tqdm():
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
