"""The trainer's side of the weight sync: which ranks send which weights where, in which order, and at what cost.

Why it exists: after each optimizer step the rollout engine must serve the new weights, and no rank may hold
the whole model to get them there. Each pipeline stage's first rank (data-parallel 0, tensor-parallel 0,
context-parallel 0) is that stage's *sender*: its tensor-parallel peers gather their shards with it
(``iter_hf_weights``), and it sends only its own stage's layers, as ``rollout.weight_sync`` says:

- SGLang, 'distributed': over its own group with the servers (``DistributedWeightSync``; stage p dials
  ``rollout.sync_address`` entry p, or the one address, or the automatic one), bucket by bucket, from GPU memory
  under NCCL;
- SGLang, 'disk': one safetensors file per stage in the version directory, which the controller then loads;
- the in-process engine on rank 0: stage 0 hands its tensors over directly, the later stages send theirs to rank
  0 with point-to-point tensor sends (a small header of names, dtypes and shapes first).

Stages go one after another: SGLang serves one weight-update request at a time per server, so two stages
sending at once could be served in opposite orders by two servers, each waiting on the other's broadcast. After
each stage every rank learns, in one small all-reduce, whether it failed and how many bytes it moved: a failure
raises on every rank (the sender's own error there, a pointer to it elsewhere) instead of leaving the others
waiting in a collective. The controller (rank 0) pauses the servers before and resumes them after.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_opd.config.base import ConfigError
from megatron_opd.config.tree import ModelConfig, RolloutConfig
from megatron_opd.model.hf_conversion.live import iter_hf_weight_buckets
from megatron_opd.parallel.state import ParallelInfo
from megatron_opd.rollout.types import RolloutError

__all__ = ["TrainerWeightSync", "stage_sync_address"]


def stage_sync_address(cfg: RolloutConfig, pp_rank: int, pp_size: int, urls: Sequence[str]) -> str:
    """The address stage ``pp_rank``'s sender binds and the servers dial (``rollout.sync_address``)."""
    from megatron_opd.rollout.sglang_weights import default_sync_address

    if not cfg.sync_address:
        return default_sync_address(list(urls))
    if len(cfg.sync_address) == 1:
        return cfg.sync_address[0]
    if len(cfg.sync_address) != pp_size:
        raise ConfigError(
            f"config key 'rollout.sync_address': {len(cfg.sync_address)} addresses for {pp_size} pipeline "
            "stages; give one address (every sender on one node) or one per pipeline stage"
        )
    return cfg.sync_address[pp_rank]


class TrainerWeightSync:
    """Built on every rank; ``sync()`` is collective over the whole world.

    Args:
        cfg: the rollout section (backend, weight_sync, sync_* fields).
        info: this rank's place in the layout.
        model_chunks, model_cfg, tp_group, cp_rank: what ``iter_hf_weights`` needs on the participating ranks.
        engine: the rollout engine (rank 0 only, None elsewhere; with rollout.engine_ranks 'data_parallel' each
            data-parallel replica's leader holds its own embedded engine and every replica syncs its own).
        urls: the rollout servers (all ranks; empty for the embedded engine).
        hf_path, weight_sync_dir: the model's HF directory and the disk sync's output directory.
        timeout_s: per-request timeout of the sync's HTTP calls and of forming a group.
    """

    def __init__(
        self,
        cfg: RolloutConfig,
        info: ParallelInfo,
        *,
        model_chunks: Sequence[torch.nn.Module],
        model_cfg: ModelConfig,
        tp_group: dist.ProcessGroup | None,
        cp_rank: int,
        engine,
        urls: Sequence[str],
        hf_path: str,
        weight_sync_dir: str,
        timeout_s: float,
    ):
        self.cfg, self.info = cfg, info
        self.chunks, self.model_cfg, self.tp_group = model_chunks, model_cfg, tp_group
        self.engine = engine
        self.timeout_s = timeout_s
        self.bucket_bytes = cfg.sync_bucket_mb << 20
        self.kind = "embedded" if cfg.backend == "embedded" else cfg.weight_sync
        every_replica = self.kind == "embedded" and cfg.engine_ranks == "data_parallel"
        self.participates = (info.dp_rank == 0 or every_replica) and cp_rank == 0
        self.is_sender = self.participates and info.tp_rank == 0
        self.controller = info.rank == 0
        # The rank whose in-process engine loads the weights: rank 0, or each replica's leader.
        self.receiver = self.kind == "embedded" and engine is not None
        self.sink = None  # this sender's DistributedWeightSync / DiskWeightSync
        if self.kind != "embedded" and self.is_sender:
            self.sink = (
                engine.weight_sync if self.controller else self._own_sink(urls, hf_path, weight_sync_dir)
            )
        # The engine's rank receives the later stages (embedded engine) from each stage's sender: its pipeline
        # group is exactly the stages' senders, in stage order (and a sender's first entry is its receiver).
        self.stage_senders: list[int] = [info.rank]
        if info.pp_size > 1 and self.participates and info.tp_rank == 0:
            from megatron.core import parallel_state as mpu

            self.stage_senders = dist.get_process_group_ranks(mpu.get_pipeline_model_parallel_group())

    def _own_sink(self, urls: Sequence[str], hf_path: str, weight_sync_dir: str):
        """A later stage's sender: its own client of the servers and its own group (or its own file)."""
        from megatron_opd.rollout.sglang_client import SGLangClient
        from megatron_opd.rollout.sglang_topology import weight_sync_urls
        from megatron_opd.rollout.sglang_weights import (
            DiskWeightSync,
            DistributedWeightSync,
            resolve_sync_backend,
        )

        targets = weight_sync_urls(list(urls))  # a router's workers in its place
        client = SGLangClient(targets, timeout_s=self.timeout_s, max_retries=self.cfg.max_retries)
        if self.kind == "disk":
            return DiskWeightSync(client, hf_dir=hf_path, out_dir=weight_sync_dir)
        pp = self.info.pp_rank
        return DistributedWeightSync(
            client,
            master_address=stage_sync_address(self.cfg, pp, self.info.pp_size, urls),
            master_port=self.cfg.sync_port + pp if self.cfg.sync_port else 0,
            backend=resolve_sync_backend(self.cfg.sync_backend),
            bucket_bytes=self.bucket_bytes,
            timeout_s=self.timeout_s,
        )

    # ------------------------------------------------------------------------------------------------------
    def sync(self) -> dict[str, float]:
        """Send the current weights to the rollout engine (collective). Returns, on rank 0, the step's
        ``sync/seconds`` and ``sync/gb_per_s`` (bytes over all stages / wall seconds on rank 0); {} elsewhere."""
        t0 = time.perf_counter()
        error: BaseException | None = None
        if self.controller and self.kind == "distributed":
            from megatron_opd.rollout.sglang_weights import open_update

            try:
                open_update(self.sink.client, self.timeout_s)
            except Exception as e:  # noqa: BLE001 - every rank raises after the flag below
                error = e
        self._check(error, "pausing the rollout servers", 0)
        total = 0
        for stage in range(self.info.pp_size):
            sent = 0
            if self.participates and self.info.pp_rank == stage:
                try:
                    sent = self._send_stage(stage)
                except Exception as e:  # noqa: BLE001
                    error = e
            elif self.receiver:
                self._receive_stage(stage)  # its bytes are counted once, by the sender
            total += self._check(error, f"sending pipeline stage {stage}'s weights", sent)
        if self.controller and self.kind != "embedded":
            error = self._finish()
        self._check(error, "finishing the weight update on the rollout servers", 0, finish=False)
        if not self.controller:
            return {}
        seconds = time.perf_counter() - t0
        return {"sync/seconds": seconds, "sync/gb_per_s": total / 1e9 / max(seconds, 1e-9)}

    def _finish(self) -> BaseException | None:
        try:
            if self.kind == "distributed":
                from megatron_opd.rollout.sglang_weights import close_update

                close_update(self.sink.client, self.timeout_s)
            else:
                self.sink.commit()
        except Exception as e:  # noqa: BLE001
            return e
        return None

    def _check(self, error: BaseException | None, what: str, nbytes: int, *, finish: bool = True) -> int:
        """One all-reduce: did any rank fail (raise everywhere), and how many bytes moved (summed). On a failure
        before the end, the controller first closes the servers' session (``finish``): they generate again, with
        the old weights or a partly updated set, which the error says."""
        failed = error is not None
        if self.info.world_size > 1:
            device = (
                torch.device("cuda", torch.cuda.current_device()) if self.info.backend == "nccl" else "cpu"
            )
            flags = torch.tensor([float(failed), float(nbytes)], dtype=torch.float64, device=device)
            dist.all_reduce(flags)
            failed, nbytes = flags[0].item() > 0, int(flags[1].item())
        if failed and finish and self.controller and self.kind == "distributed":
            self._finish()  # best effort; its own failure would hide the first one
        if error is not None:
            raise error
        if failed:
            raise RolloutError(
                f"weight sync failed while {what} on another rank (its own error, with the server it names, is "
                "raised there); the servers may hold a partly updated model until the next sync"
            )
        return nbytes

    def _weights(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        return iter_hf_weight_buckets(
            self.chunks, self.model_cfg, tp_group=self.tp_group, bucket_bytes=self.bucket_bytes
        )

    def _send_stage(self, stage: int) -> int:
        """This stage's weights, from its sender, to the engine; its TP peers only take part in the gathers."""
        buckets = self._weights()
        if not self.is_sender:
            for _ in buckets:
                pass
            return 0
        try:
            if self.kind == "distributed":
                return self.sink.send(buckets)
            if self.kind == "disk":
                return self.sink.write(buckets, part=stage)
            if stage == 0:  # the engine's own rank: straight into the in-process engine, bucket by bucket
                sent = 0
                for bucket in buckets:
                    self.engine.update_weights(bucket)
                    sent += sum(t.numel() * t.element_size() for _, t in bucket)
                return sent
            return self._send_to_receiver(buckets)
        finally:
            # After a failure the TP peers are still gathering: finish the walk so they are not left waiting.
            for _ in buckets:
                pass

    def _send_to_receiver(self, buckets: Iterator[list[tuple[str, torch.Tensor]]]) -> int:
        receiver = self.stage_senders[0]  # the first stage of this sender's pipeline group holds the engine
        sent = 0
        for bucket in buckets:
            header = [[(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in bucket]]
            dist.send_object_list(header, dst=receiver)
            for _, t in bucket:
                dist.send(t.detach().contiguous(), dst=receiver)
                sent += t.numel() * t.element_size()
        dist.send_object_list([None], dst=receiver)  # end of this stage
        return sent

    def _receive_stage(self, stage: int) -> int:
        """The engine's rank: stage ``stage``'s tensors from its sender, loaded bucket by bucket."""
        src = self.stage_senders[stage]
        device = torch.device("cuda", torch.cuda.current_device()) if self.info.backend == "nccl" else "cpu"
        got = 0
        while True:
            header: list = [None]
            dist.recv_object_list(header, src=src)
            if header[0] is None:
                return got
            pairs = []
            for name, dtype, shape in header[0]:
                t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                dist.recv(t, src=src)
                pairs.append((name, t))
                got += t.numel() * t.element_size()
            self.engine.update_weights(pairs)

    def close(self) -> None:
        """Leave this sender's weight-sync group (rank 0's is the engine's, closed with the engine)."""
        if self.sink is not None and not self.controller and hasattr(self.sink, "close"):
            self.sink.close()
