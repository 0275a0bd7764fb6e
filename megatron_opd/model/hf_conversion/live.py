"""HF-named weights to and from the live, possibly TP/PP-sharded, Megatron model.

Why it exists: the rollout engines need the student's current weights under Hugging Face names every training
step, and a run may start from a HF checkpoint without an offline conversion. Both go through the one rule list
of ``architecture.py``:

- ``iter_hf_weights`` / ``iter_hf_weight_buckets``: walk this rank's model chunks, all-gather each tensor-parallel
  shard over ``tp_group``, and yield full HF tensors. Each pipeline stage yields only its own layers, already
  renamed to their *global* layer index (``TransformerLayer.layer_number``), so the union over stages is the
  whole model. Every rank of a TP group takes part in the all-gathers and yields the same tensors.
- ``load_hf_weights``: the inverse; every rank reads the HF tensors of its own parameters and keeps its TP shard.

Vocabulary padding: the Megatron embedding and LM head have ``padded_vocab_size`` rows, the HF ones exactly
``vocab_size``; the padding rows are zero on the way in and dropped on the way out, so they never reach a rollout
engine. (Inside the trainer, logits are sliced to ``vocab_size`` before any softmax.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_opd.config.tree import ModelConfig
from megatron_opd.model.hf_conversion import architecture as A
from megatron_opd.model.hf_conversion import tensors as T
from megatron_opd.model.hf_conversion.hf_files import HFCheckpointReader

# HF tensors that carry no weights of their own and are not converted.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The bare ``GPTModel`` inside Megatron's DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def check_tensor_parallel(model_cfg: ModelConfig, tp_size: int) -> None:
    """Fail clearly when ``tp_size`` cannot split the model's heads, KV groups or MLP."""
    for what, n in (
        ("num_attention_heads", model_cfg.num_attention_heads),
        ("num_query_groups (key/value heads)", model_cfg.num_query_groups),
        ("ffn_hidden_size", model_cfg.ffn_hidden_size),
    ):
        if n % tp_size:
            raise A.ConversionError(
                f"tensor-parallel size {tp_size} does not divide {what} = {n}; choose a TP size that divides "
                f"num_attention_heads ({model_cfg.num_attention_heads}) and num_query_groups "
                f"({model_cfg.num_query_groups})"
            )


def _tp(tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _global_params(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(name with global layer index, parameter)`` for one model chunk."""
    model = unwrap(chunk)
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    for name, param in model.named_parameters():
        split = A.split_layer_name(name)
        if split is not None:
            local, rest = split
            name = f"decoder.layers.{layers[local].layer_number - 1}.{rest}"
        yield name, param


def _rule_index(model_cfg: ModelConfig) -> dict[str, A.Rule]:
    return dict(A.iter_rules_by_megatron(A.decoder_rules(model_cfg)))


_TIED_OUTPUT = A.Rule("output_layer.weight", ("model.embed_tokens.weight",), "vocab", 0)


def _lookup(
    rules: dict[str, A.Rule], name: str, model_cfg: ModelConfig, *, loading: bool = False
) -> A.Rule | None:
    if name in rules:
        return rules[name]
    if name == "output_layer.weight" and not model_cfg.untie_embeddings_and_output_weights:
        # With PP > 1 the last stage holds its own copy of the tied embedding (Megatron keeps it in sync). HF
        # has no lm_head: loading fills the copy from embed_tokens, exporting skips it.
        return _TIED_OUTPUT if loading else None
    raise A.ConversionError(
        f"Megatron parameter {name!r} has no Hugging Face counterpart for architecture {model_cfg.architecture!r}"
    )


def _gather(tensor: torch.Tensor, rule: A.Rule, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    _, size = _tp(tp_group)
    if size == 1 or rule.tp_dim is None:
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(shards, tensor.contiguous(), group=tp_group)
    return T.merge_tp_shards(shards, dim=rule.tp_dim, layout=rule.tp_layout)


@torch.no_grad()
def iter_hf_weights(
    model_chunks: Sequence[torch.nn.Module],
    model_cfg: ModelConfig,
    *,
    tp_group: dist.ProcessGroup | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every weight held by this rank's pipeline stage, TP shards gathered.

    Args:
        model_chunks: this rank's model chunks (one, or one per virtual stage), bare or DDP/Float16Module-wrapped.
        model_cfg: the student's ``ModelConfig`` (vocab_size is the HF row count the output is cut to).
        tp_group: the tensor-parallel group (``parallel_state.get_tensor_model_parallel_group()``); None for an
            unsharded model. Every rank of the group must iterate in step (the gathers are collective).
    Yields:
        HF names with global layer indices and full tensors in the model's dtype, on the model's device. Tensors
        that need no rearranging are the parameters' own (detached) storage: copy them before the next
        optimizer step if they must outlive it.
    """
    check_tensor_parallel(model_cfg, _tp(tp_group)[1])
    rules = _rule_index(model_cfg)
    for chunk in model_chunks:
        for name, param in _global_params(chunk):
            rule = _lookup(rules, name, model_cfg)
            if rule is None:
                continue
            yield from A.to_hf(rule, _gather(param.detach(), rule, tp_group), model_cfg)


def iter_hf_weight_buckets(
    model_chunks: Sequence[torch.nn.Module],
    model_cfg: ModelConfig,
    *,
    tp_group: dist.ProcessGroup | None = None,
    bucket_bytes: int = 512 * 2**20,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``iter_hf_weights`` grouped into lists of at most ``bucket_bytes`` (a larger tensor gets its own list).

    The weight-sync unit: a rollout engine receives one bucket per transfer, so peak extra memory is one bucket.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in iter_hf_weights(model_chunks, model_cfg, tp_group=tp_group):
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def load_hf_weights(
    model_chunks: Sequence[torch.nn.Module],
    checkpoint: HFCheckpointReader | str,
    model_cfg: ModelConfig,
    *,
    tp_group: dist.ProcessGroup | None = None,
    progress: Iterable | None = None,
) -> set[str]:
    """Copy a HF checkpoint into this rank's (possibly sharded) model chunks, in place.

    Each rank reads, converts and slices only the tensors its own parameters need, one at a time. Fails if a
    parameter has no HF tensor or a HF tensor's shape does not fit ``model_cfg``. Returns the HF names used, so a
    caller can detect checkpoint tensors that nothing consumed (``unused_hf_tensors``).
    """
    reader = HFCheckpointReader(checkpoint) if isinstance(checkpoint, str) else checkpoint
    rank, size = _tp(tp_group)
    check_tensor_parallel(model_cfg, size)
    rules = _rule_index(model_cfg)
    used: set[str] = set()
    for chunk in model_chunks:
        params = list(_global_params(chunk))
        for name, param in params if progress is None else progress(params):
            rule = _lookup(rules, name, model_cfg, loading=True)
            if rule is None:
                continue
            missing = [n for n in rule.hf if n not in reader]
            if missing:
                raise A.ConversionError(f"the HF checkpoint {reader.dir} lacks {missing} (needed for {name})")
            hf = [reader.get(n) for n in rule.hf]
            padded = param.shape[0] * (size if rule.tp_dim == 0 else 1)
            full = A.to_megatron(rule, hf, model_cfg, padded)
            if rule.tp_dim is not None:
                full = T.split_tp_shard(full, rank=rank, size=size, dim=rule.tp_dim, layout=rule.tp_layout)
            if full.shape != param.shape:
                raise A.ConversionError(
                    f"{name}: converted shape {tuple(full.shape)} != the model's {tuple(param.shape)} (TP {size})"
                )
            param.copy_(full)
            used.update(rule.hf)
    return used


def unused_hf_tensors(reader: HFCheckpointReader, used: set[str], model_cfg: ModelConfig) -> list[str]:
    """HF tensors a full-model load did not consume (a sign the config does not describe the checkpoint)."""
    leftover = [n for n in reader.names() if n not in used and not n.endswith(_IGNORED_HF_SUFFIXES)]
    if not model_cfg.untie_embeddings_and_output_weights:
        leftover = [n for n in leftover if n != "lm_head.weight"]  # a tied checkpoint may store the copy
    return leftover
