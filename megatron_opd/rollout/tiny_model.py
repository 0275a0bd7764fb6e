"""Make a tiny random Hugging Face Qwen2/Llama directory (weights, config, tokenizer) on the spot.

Why it exists: there is no model hub here, yet engine tests, parity tests and benchmarks need a real HF directory
that `transformers`, the embedded engine and an SGLang server all load the same way. The tokenizer is a word-level
`tokenizers` model over ``vocab_size`` tokens ("<eos>", "<pad>", then "t2", "t3", ...), saved as a fast tokenizer
so `AutoTokenizer` (SGLang) accepts it.
"""

from __future__ import annotations

import os

import torch

__all__ = ["make_tiny_hf_model", "make_tiny_pair", "EOS_ID", "PAD_ID"]

EOS_ID = 0
PAD_ID = 1


def make_tiny_hf_model(
    path: str,
    *,
    arch: str = "qwen2",
    vocab_size: int = 128,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    seed: int = 0,
    init_std: float = 0.5,
) -> str:
    """Save a randomly initialised fp32 model + tokenizer under ``path``; returns ``path``.

    ``init_std`` is larger than HF's 0.02 so the tiny model's next-token distributions are far from uniform
    (tests of top-p, top-K and EOS stopping need peaked distributions).
    """
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    os.makedirs(path, exist_ok=True)
    cfg_cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[arch]
    extra = {"attention_bias": False} if arch == "llama" else {}
    cfg = cfg_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=rope_theta,
        max_position_embeddings=4096,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        initializer_range=init_std,
        dtype="float32",
        **extra,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.save_pretrained(path)

    vocab = {"<eos>": EOS_ID, "<pad>": PAD_ID}
    vocab.update({f"t{i}": i for i in range(2, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(path)
    return path


def make_tiny_pair(root: str, *, num_prompts: int = 24) -> str:
    """A tiny student (seed 0) and teacher (seed 1) sharing one tokenizer, and ``data.jsonl`` with ``num_prompts``
    word-level prompts, under ``root`` (made once; later calls reuse it). Returns ``root``.

    The distillation pair of the e2e tests, the kill-and-resume harness and the analysis-tool tests.
    """
    import json

    data = os.path.join(root, "data.jsonl")
    if not os.path.exists(data):
        make_tiny_hf_model(os.path.join(root, "student"), seed=0)
        make_tiny_hf_model(os.path.join(root, "teacher"), seed=1)
        with open(data + ".tmp", "w", encoding="utf-8") as f:
            for i in range(num_prompts):
                prompt = " ".join(f"t{2 + (i * 7 + j) % 100}" for j in range(3 + i % 4))
                f.write(json.dumps({"prompt": prompt, "answer": "t5"}) + "\n")
        os.replace(data + ".tmp", data)
    return root
