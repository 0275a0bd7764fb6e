"""Load a checkpoint's tokenizer exactly as its ``tokenizer.json`` defines it.

Why it exists: transformers 5's ``AutoTokenizer`` picks a class from the model type in ``config.json``
(``Qwen2Tokenizer`` for every qwen2 checkpoint) and that class rebuilds its own pre-tokenizer, ignoring the one
in ``tokenizer.json``. For the real Qwen checkpoints the two agree; for any other tokenizer saved next to a qwen2
config (the project's tiny test and toy models) it silently tokenizes to nothing. Reading ``tokenizer.json``
through the generic fast class keeps the file's pre-tokenizer, added tokens and the chat template of
``tokenizer_config.json``; checkpoints with only a sentencepiece model fall back to ``AutoTokenizer``.
"""

from __future__ import annotations

import os
from typing import Any


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer of the HF directory ``path`` (see the module docstring for the choice of class)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory '{path}' does not exist")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
