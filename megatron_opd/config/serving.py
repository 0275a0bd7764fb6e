"""The ``rollout`` and ``teacher`` sections of the config tree: the engines that generate and score.

Why it exists: both sections name model servers (SGLang URLs, a launched server) under the same rules, checked
by one helper here (``config/tree.py`` gathers every section).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_opd.config.base import check_range, fail


def _check_servers(section: str, urls: list[str], launch: bool, backend: str) -> None:
    """``section.sglang_urls`` are http(s) URLs, and ``section.launch_server`` goes with backend 'sglang' and no
    URLs (rollout and teacher share these rules)."""
    for url in urls:
        if not url.startswith(("http://", "https://")):
            fail(f"{section}.sglang_urls", url, "URLs starting with http:// or https://")
    if launch and backend != "sglang":
        fail(f"{section}.launch_server", launch, f"{section}.backend 'sglang'")
    if launch and urls:
        fail(
            f"{section}.launch_server",
            launch,
            f"no {section}.sglang_urls (the launched server's URL is used)",
        )


@dataclass(kw_only=True)
class RolloutConfig:
    """How the student samples responses (the rollout engine)."""

    backend: Literal["embedded", "sglang"] = "embedded"
    """'embedded' (in-process, the CPU default) or 'sglang' (SGLang servers)."""
    engine_ranks: Literal["controller", "data_parallel"] = "controller"
    """backend 'embedded': where the in-process engines run. 'controller': one engine on rank 0, which generates
    (and scores) the whole step and hands each data-parallel rank its share. 'data_parallel': one engine on every
    data-parallel rank's leader (TP = PP = CP rank 0), each generating and scoring its own share of the step's
    prompts, so the rollout phase shrinks with the data-parallel size (the colocated layout of verl's hybrid
    engine), at the cost of one engine's weights on each leader. Same objective either way; the samples differ
    only by their random streams (greedy rollouts are identical)."""
    temperature: float = 1.0
    """Sampling temperature (paper: 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling mass (paper: 1.0)."""
    max_prompt_length: int = 1024
    """Longest prompt in tokens (paper: 1024)."""
    max_response_length: int = 15360
    """T_max: longest response in tokens for full rollouts (paper: 15,360)."""
    over_long_prompts: Literal["skip", "error"] = "skip"
    """What to do with a prompt longer than max_prompt_length: count and skip it, or stop with an error."""
    sglang_urls: list[str] = field(default_factory=list)
    """Student SGLang servers (http://host:port); requests are spread over them."""
    max_concurrency: int = 64
    """Requests in flight per server."""
    request_timeout_s: float = 600.0
    """Seconds before one request is abandoned and retried."""
    max_retries: int = 3
    """Retries per request, with exponential backoff, before the step fails naming the server."""
    weight_sync: Literal["distributed", "disk"] = "distributed"
    """How new student weights reach SGLang: a collective broadcast, or a checkpoint the server reloads."""
    sync_address: list[str] = field(default_factory=list)
    """weight_sync 'distributed': the address of the sending trainer rank that the servers dial (its store binds
    this address only). Empty: loopback when every sglang_urls host is loopback, else the address of this node
    that routes to the first server. One address: used by every pipeline stage's sender (all on one node). One per
    pipeline stage: stage p's sender (on its own node) uses entry p."""
    sync_port: int = 0
    """weight_sync 'distributed': stage p's sender listens on sync_port + p; 0 picks a free port per sender."""
    sync_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Backend of the weight-sync group: 'auto' is NCCL with CUDA (tensors sent from GPU memory), gloo without."""
    sync_bucket_mb: int = 256
    """Megabytes of weights announced per /update_weights_from_distributed request (one bucket)."""
    launch_server: bool = False
    """backend 'sglang': rank 0 starts an SGLang server for model.hf_path on loopback at start-up (.venv-sglang;
    fp32 on CPU), uses it as sglang_urls and stops it at exit. One node only; at scale start servers yourself."""
    launch_args: list[str] = field(default_factory=list)
    """Extra ``sglang.launch_server`` flags for a launched server (e.g. ``--mem-fraction-static 0.3`` on GPU)."""

    def __post_init__(self) -> None:
        check_range("rollout.temperature", self.temperature, 0.0)
        check_range("rollout.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_range("rollout.max_prompt_length", self.max_prompt_length, 1)
        check_range("rollout.max_response_length", self.max_response_length, 1)
        check_range("rollout.max_concurrency", self.max_concurrency, 1)
        check_range("rollout.request_timeout_s", self.request_timeout_s, 0.0, lo_open=True)
        check_range("rollout.max_retries", self.max_retries, 0)
        _check_servers("rollout", self.sglang_urls, self.launch_server, self.backend)
        if self.engine_ranks == "data_parallel" and self.backend != "embedded":
            fail(
                "rollout.engine_ranks",
                self.engine_ranks,
                "'controller' with backend 'sglang' (the servers already serve every rank's requests)",
            )
        for addr in self.sync_address:
            if not addr or "/" in addr or addr.count(":") == 1:  # one colon: host:port (IPv6 has several)
                fail("rollout.sync_address", addr, "bare host addresses (no scheme, no port: see sync_port)")
        check_range("rollout.sync_port", self.sync_port, 0, 65535)
        check_range("rollout.sync_bucket_mb", self.sync_bucket_mb, 1)


@dataclass(kw_only=True)
class TeacherConfig:
    """The teacher that scores student rollouts."""

    hf_path: str | None = None
    """Hugging Face directory of the teacher model."""
    backend: Literal["embedded", "sglang", "megatron"] = "embedded"
    """'embedded' (in-process scoring on rank 0), 'sglang' (prefill-only scoring on SGLang servers) or 'megatron'
    (a forward-only Megatron copy of the teacher inside the training step, with the student's TP/PP layout: its
    final hidden states meet the student's in the fused two-model loss, so any top-K strategy and the exact
    full-vocabulary KL cost no requests; see teacher/megatron.py for its memory)."""
    sglang_urls: list[str] = field(default_factory=list)
    """Teacher SGLang servers (http://host:port)."""
    topk: int = 16
    """K of the top-K logprobs used by the top-K KL term (paper: 16); 0 disables top-K."""
    topk_strategy: Literal["student", "teacher"] = "student"
    """Whose top-K tokens the KL term runs over: the student's (paper default) or the teacher's."""
    allow_vocab_padding_mismatch: bool = True
    """Accept a teacher whose embedding rows differ from the student's when the tokenizers are identical."""
    launch_server: bool = False
    """backend 'sglang': rank 0 starts an SGLang server for hf_path on loopback at start-up and stops it at exit
    (as rollout.launch_server)."""
    launch_args: list[str] = field(default_factory=list)
    """Extra ``sglang.launch_server`` flags for a launched teacher server."""
    offload: bool = False
    """backend 'megatron' on GPU: keep the teacher's weights in host memory between steps and copy them to the
    GPU only for its forward pass (frees its weight memory during the student's backward and the rollouts, at
    the cost of one host-to-device copy of the weights per step). No effect on CPU."""

    def __post_init__(self) -> None:
        check_range("teacher.topk", self.topk, 0)
        if self.backend == "megatron" and self.hf_path is None:
            fail(
                "teacher.backend",
                "megatron",
                "teacher.hf_path set (the teacher's HF directory to build from)",
            )
        if self.backend == "megatron" and self.sglang_urls:
            fail("teacher.sglang_urls", self.sglang_urls, "no URLs with teacher.backend 'megatron'")
        if self.offload and self.backend != "megatron":
            fail(
                "teacher.offload",
                True,
                "teacher.backend 'megatron' (only that teacher has weights to offload)",
            )
        _check_servers("teacher", self.sglang_urls, self.launch_server, self.backend)
        if self.launch_server and self.hf_path is None:
            fail("teacher.launch_server", True, "teacher.hf_path set (the model the server serves)")
