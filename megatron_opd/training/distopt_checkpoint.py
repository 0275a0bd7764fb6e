"""Checkpoint the distributed optimizer's state in model space (megatron-core 0.16.1 could not round-trip it).

Why it exists: Megatron's distributed optimizer shards Adam's moments (and the fp32 main params under bf16)
as flat ranges of each parameter over data-parallel ranks. On megatron-core 0.16.1 none of its checkpoint
formats round-tripped through torch_dist (the default model-space format uses ``flattened_range``, which the
torch_dist strategy rejects; 'dp_reshardable' and 'fully_reshardable' failed in other ways). This module
stores the state the way the regular optimizer does: for every parameter one whole tensor per state
(``optimizer.state.exp_avg.<param key>``, ``exp_avg_sq``, and ``fp32_param`` when the model is not fp32),
carrying the parameter's own TP/PP sharding metadata. Saving gathers each parameter's DP ranges with an
all-reduce over the optimizer's data-parallel group; loading slices this rank's range back out. The result
re-shards across TP, PP and DP like the model itself.

Cost: during a save each rank briefly holds the full (TP/PP-local) fp32 state of its parameters, on CPU.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
from megatron.core.optimizer.optimizer import MegatronOptimizer

from megatron_opd.parallel.collectives import collective_device

_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _sub_optimizers(optimizer: MegatronOptimizer) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _model_params_in_order(opt: Any) -> list[tuple[torch.nn.Parameter, int, int]]:
    """Every parameter of the optimizer's buffers with this rank's flat range [start, end) of it (empty when
    another DP rank owns all of it), in buffer order: the same list on every DP rank."""
    out = []
    for buffer in opt.buffers:
        for param in sorted(buffer.params, key=lambda p: buffer.param_index_map[p][0]):
            if param in opt.model_param_gbuf_map:
                r = opt._get_model_param_range_map(param)["param"]
                out.append((param, r.start, r.end))
            else:
                out.append((param, 0, 0))
    return out


def _main_params(opt: Any) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Model param -> this rank's fp32 main shard (the tensor the inner Adam updates).

    Built from the optimizer's own paired group lists: Megatron's ``_get_main_param_and_optimizer_states``
    indexes by the position in the mixed group, which is wrong when a group holds both fp32 and bf16 params
    (local-spec norms stay fp32 in a bf16 model)."""
    out = {}
    for g in range(len(opt.model_float16_groups)):
        for mp, sp in zip(opt.model_fp32_groups[g], opt.shard_fp32_groups[g]):
            out[mp] = sp
        for mp, sp in zip(opt.model_float16_groups[g], opt.shard_fp32_from_float16_groups[g]):
            out[mp] = sp
    return out


def _param_to_sharded(model_sd: dict[str, Any]) -> dict[torch.Tensor, Any]:
    tensors, _ = extract_sharded_tensors_and_factories(model_sd)
    return {sh.data: sh for sh in nested_values(tensors)}


def _keys_for(param: torch.nn.Parameter) -> tuple[str, ...]:
    return _STATE_KEYS if param.dtype == torch.float32 else (*_STATE_KEYS, "fp32_param")


def _sharded(meta: Any, key: str, data: torch.Tensor) -> Any:
    kwargs: dict[str, Any] = dict(key=f"optimizer.state.{key}.{meta.key}", data=data)
    if not isinstance(meta, ShardedTensorFactory):
        kwargs["dtype"] = data.dtype
    return replace(meta, **kwargs)


def sharded_state_dict(
    optimizer: MegatronOptimizer, model_sd: dict[str, Any], *, is_loading: bool
) -> dict[str, Any]:
    """The optimizer's part of the sharded checkpoint (see module doc); collective over DP ranks when saving."""
    param_meta = _param_to_sharded(model_sd)
    out: dict[str, Any] = {}
    for i, opt in enumerate(_sub_optimizers(optimizer)):
        mains = _main_params(opt)
        tensors: dict[str, dict[str, Any]] = {}
        for idx, (param, start, end) in enumerate(_model_params_in_order(opt)):
            meta = param_meta.get(param)
            if meta is None:
                raise ValueError(
                    f"parameter of shape {tuple(param.shape)} missing from the model's sharded state"
                )
            keys = _keys_for(param)
            if is_loading:
                full = {k: torch.empty(param.shape, dtype=torch.float32) for k in keys}
            else:
                flat = torch.zeros(
                    len(keys),
                    param.numel(),
                    dtype=torch.float32,
                    device=collective_device(opt.data_parallel_group),
                )
                if end > start:
                    main = mains[param]
                    state = {"fp32_param": main, **opt.optimizer.state[main]}
                    for j, k in enumerate(keys):
                        flat[j, start:end] = state[k].detach().float()
                dist.all_reduce(
                    flat, group=opt.data_parallel_group
                )  # DP ranges are disjoint and cover the param
                full = {k: flat[j].view(param.shape).cpu() for j, k in enumerate(keys)}
            tensors[str(idx)] = {k: _sharded(meta, k, v) for k, v in full.items()}
        entry: dict[str, Any] = {"tensors": tensors}
        if not is_loading:
            entry["common"] = opt.state_dict()  # param groups (with Adam's step) and the grad scaler
        out[f"sub{i}"] = entry
    return {"distopt": out}


@torch.no_grad()
def load_state_dict(optimizer: MegatronOptimizer, loaded: dict[str, Any]) -> None:
    """Scatter a loaded model-space state (``sharded_state_dict(..., is_loading=True)`` filled by
    ``dist_checkpointing.load``) into this rank's shards. Model weights must be loaded first."""
    if "distopt" not in loaded:
        raise ValueError("this checkpoint's optimizer state was not written by the distributed optimizer")
    subs = _sub_optimizers(optimizer)
    if len(loaded["distopt"]) != len(subs):
        raise ValueError(
            f"checkpoint has {len(loaded['distopt'])} optimizer groups, this optimizer {len(subs)}"
        )
    for i, opt in enumerate(subs):
        entry = loaded["distopt"][f"sub{i}"]
        mains = _main_params(opt)
        opt.load_state_dict(entry["common"])  # allocates the shards and sets param groups and step
        # Without apex/TE, Megatron gives every parameter the SAME step tensor, and torch's Adam increments each
        # parameter's step in place: shared, it would advance once per parameter per update. Un-share it.
        for st in opt.optimizer.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()
        for idx, (param, start, end) in enumerate(_model_params_in_order(opt)):
            if end == start:
                continue  # another DP rank holds all of this parameter's state
            full = entry["tensors"][str(idx)]
            main = mains[param]
            state = opt.optimizer.state[main]
            for (
                k
            ) in _STATE_KEYS:  # new tensors: Megatron's allocation can mis-size them in mixed-dtype groups
                state[k] = full[k].reshape(-1)[start:end].to(device=main.device, dtype=torch.float32).clone()
            fp32 = full["fp32_param"] if "fp32_param" in full else param.detach().float()
            main.data.copy_(fp32.reshape(-1)[start:end])
