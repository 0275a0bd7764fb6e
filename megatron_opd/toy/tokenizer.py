"""A character-level tokenizer for the toy task, saved as a Hugging Face tokenizer.

Why it exists: the toy models must load through the same code paths as real checkpoints
(``transformers.AutoTokenizer``, ``tokenizer.json`` + ``tokenizer_config.json``), while keeping the vocabulary
tiny (one token per character of the task's alphabet plus ``<pad>``, ``<eos>``, ``<unk>``) so the models are fast on a CPU.
The tokenizer has no chat template and adds no special tokens: a prompt is exactly its characters.
"""

from __future__ import annotations

import os

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)


def build_char_tokenizer(alphabet: str):
    """A ``PreTrainedTokenizerFast`` with ids 0..2 = <pad>, <eos>, <unk>, then one id per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"the alphabet has repeated characters: {alphabet!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=1 << 20,
    )


def save_char_tokenizer(path: str | os.PathLike[str], alphabet: str):
    """Build the tokenizer and save it (tokenizer.json, tokenizer_config.json, special_tokens_map) to ``path``."""
    import json

    tokenizer = build_char_tokenizer(alphabet)
    tokenizer.save_pretrained(os.fspath(path))
    # transformers 5 writes its own class name; the generic fast class also loads in transformers 4 (SGLang).
    cfg_path = os.path.join(os.fspath(path), "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    return tokenizer
