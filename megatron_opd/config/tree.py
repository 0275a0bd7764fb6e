"""The one config tree of megatron-opd: a dataclass per subsystem, gathered in ``OPDConfig``.

Why it exists: every knob of a run lives here once, with its docstring and its validation. YAML files and the
command line are generated from these classes (``config/loader.py``), and functions receive the section they
need, never the whole tree. Field names follow Megatron-LM where it has one (``tensor_model_parallel_size``,
``micro_batch_size``, ``global_batch_size``, ``lr``, ``clip_grad`` ...), so Megatron users find what they know.
Validation that needs two sections at once (for instance the batch sizes against the world size) lives in
``OPDConfig.__post_init__`` and ``OPDConfig.check_world_size``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from megatron_opd.config.base import ConfigError, check_range, fail

ParamsDtype = Literal["float32", "bfloat16", "float16"]


@dataclass(kw_only=True)
class ModelConfig:
    """The student's architecture (and where its weights come from)."""

    hf_path: str | None = None
    """Hugging Face model directory (config.json + safetensors). When set, the architecture fields below
    (architecture ... untie_embeddings_and_output_weights) are read from its config.json: leave them out; one
    given with a value the checkpoint contradicts is an error."""
    architecture: Literal["qwen2", "llama"] = "qwen2"
    """Model family: 'qwen2' (QKV bias, untied embeddings by default) or 'llama'."""
    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 176
    """SwiGLU intermediate size."""
    num_attention_heads: int = 4
    """Number of query heads."""
    num_query_groups: int = 2
    """Number of key/value heads (GQA); equal to num_attention_heads for multi-head attention."""
    vocab_size: int = 128
    """Rows of the embedding as stored in the HF checkpoint (may exceed the tokenizer's size, e.g. Qwen)."""
    max_position_embeddings: int = 2048
    """Longest sequence the position embedding supports."""
    rotary_base: float = 1_000_000.0
    """RoPE base (theta): 1e6 for Qwen2, 1e4 or 5e5 for Llama variants."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    add_qkv_bias: bool = True
    """Bias on the Q, K, V projections (Qwen2: true, Llama: false)."""
    untie_embeddings_and_output_weights: bool = True
    """Separate LM-head weight (true) or the LM head tied to the input embedding (false)."""
    make_vocab_size_divisible_by: int = 128
    """The Megatron embedding is padded to a multiple of this times the tensor-parallel size."""
    params_dtype: ParamsDtype = "float32"
    """Parameter and activation dtype; 'bfloat16' trains with fp32 main params in the optimizer."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 recipe for Transformer-Engine layers (GPU with TE only); None disables FP8."""
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    """Layer spec: Transformer-Engine when it imports ('auto'), or Megatron's local spec."""
    local_attention: Literal["auto", "sdpa", "megatron"] = "auto"
    """Core attention of Megatron's local spec (no effect with TE layers): torch SDPA, flash/memory-efficient
    kernels with O(s) memory ('sdpa'), or Megatron's DotProductAttention with [s, s] scores ('megatron');
    'auto' picks 'sdpa' when CUDA is present and 'megatron' on CPU."""
    recompute_activations: bool = False
    """Recompute each transformer layer in the backward pass to save activation memory."""

    def __post_init__(self) -> None:
        for key in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
        ):
            check_range(f"model.{key}", getattr(self, key), 1)
        check_range("model.vocab_size", self.vocab_size, 2)
        check_range("model.make_vocab_size_divisible_by", self.make_vocab_size_divisible_by, 1)
        if self.hidden_size % self.num_attention_heads:
            fail(
                "model.hidden_size",
                self.hidden_size,
                f"a multiple of num_attention_heads ({self.num_attention_heads})",
            )
        if self.num_attention_heads % self.num_query_groups:
            fail(
                "model.num_query_groups",
                self.num_query_groups,
                f"a divisor of num_attention_heads ({self.num_attention_heads})",
            )
        check_range("model.rotary_base", self.rotary_base, 0, lo_open=True)
        check_range("model.norm_epsilon", self.norm_epsilon, 0, lo_open=True)
        if self.fp8 is not None and self.params_dtype == "float32":
            fail("model.fp8", self.fp8, "None with params_dtype 'float32' (FP8 training runs in bf16)")


@dataclass(kw_only=True)
class ParallelConfig:
    """How the student is split over ranks (Megatron's model-parallel groups)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (splits heads, MLP and vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (splits layers into stages)."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline stage for the interleaved schedule; None disables interleaving."""
    context_parallel_size: int = 1
    """Context-parallel size (splits the sequence across ranks in attention)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism for norms and dropout; needs tensor_model_parallel_size > 1."""
    data_parallel_size: int | None = None
    """Data-parallel size; None derives it as world_size / (TP * PP * CP). Checked against the world size."""
    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: 'auto' is NCCL with CUDA and gloo without."""
    distributed_timeout_minutes: int = 30
    """Timeout of collective operations."""

    def __post_init__(self) -> None:
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            check_range(f"parallel.{key}", getattr(self, key), 1)
        check_range("parallel.data_parallel_size", self.data_parallel_size, 1)
        check_range(
            "parallel.virtual_pipeline_model_parallel_size", self.virtual_pipeline_model_parallel_size, 1
        )
        if self.virtual_pipeline_model_parallel_size is not None and self.pipeline_model_parallel_size < 2:
            fail(
                "parallel.virtual_pipeline_model_parallel_size",
                self.virtual_pipeline_model_parallel_size,
                "None unless pipeline_model_parallel_size > 1",
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            fail("parallel.sequence_parallel", True, "false when tensor_model_parallel_size is 1")
        check_range("parallel.distributed_timeout_minutes", self.distributed_timeout_minutes, 1)

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        )

    def resolve_data_parallel_size(self, world_size: int) -> int:
        """DP size for ``world_size`` ranks; fails with the arithmetic spelled out if the layout does not fit."""
        mp = self.model_parallel_size
        if world_size % mp:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size}) x pipeline_model_parallel_size "
                f"({self.pipeline_model_parallel_size}) x context_parallel_size ({self.context_parallel_size}) = {mp}; "
                "launch a multiple of that many processes or change the parallel sizes"
            )
        dp = world_size // mp
        if self.data_parallel_size is not None and self.data_parallel_size != dp:
            raise ConfigError(
                f"config key 'parallel.data_parallel_size': got {self.data_parallel_size}, but world size "
                f"{world_size} / (TP*PP*CP = {mp}) gives {dp}; set it to {dp} or leave it unset"
            )
        return dp


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


@dataclass(kw_only=True)
class HorizonConfig:
    """Which prefix of each response is generated and distilled (the paper's horizon control)."""

    schedule: Literal["full", "truncated", "progressive", "segment", "adaptive"] = "progressive"
    """'full' (OPD), 'truncated' (TOPD, H = rho*T), 'progressive' (POPD, Eq. 11), 'segment' (distil [a, b)
    only, Section 6.3) or 'adaptive' (grow H when the current prefix is learned; see algorithms/horizon.py)."""
    rho: float = 0.25
    """TOPD truncation ratio: H = ceil(rho * max_response_length)."""
    h0: int = 9
    """POPD initial horizon H_0 in tokens."""
    delta_h: int = 9
    """POPD horizon increment dH in tokens (paper: 9)."""
    delta_k: int = 1
    """POPD steps between increments dk (paper: 1)."""
    segment_start: float = 0.0
    """Segment ablation: start a of the distilled window [a, b), a fraction of T_max or tokens (segment_unit)."""
    segment_end: float = 0.1
    """Segment ablation: end b of the distilled window [a, b)."""
    segment_unit: Literal["fraction", "tokens"] = "fraction"
    """Whether segment_start/segment_end are fractions of T_max or token counts."""
    adaptive_signal: Literal["log_ratio", "kl"] = "kl"
    """Adaptive: the per-token signal averaged over the last window of the horizon."""
    adaptive_threshold: float = 0.05
    """Adaptive: grow when the signal's moving mean falls below this (nats per token)."""
    adaptive_window: int = 16
    """Adaptive: how many last tokens of the current horizon the signal is measured over."""
    adaptive_patience: int = 2
    """Adaptive: consecutive steps the signal must stay below the threshold before growing."""
    adaptive_growth: int = 16
    """Adaptive: tokens added per growth (the cap on the growth rate)."""
    adaptive_min_steps_between: int = 1
    """Adaptive: fewest steps between two growths."""
    adaptive_max_steps_between: int | None = None
    """Adaptive: force a growth after this many steps without one (a floor on the growth rate); None: never."""
    adaptive_ema: float = 0.5
    """Adaptive: weight of the newest step in the signal's exponential moving mean."""

    def __post_init__(self) -> None:
        check_range("horizon.rho", self.rho, 0.0, 1.0, lo_open=True)
        check_range("horizon.h0", self.h0, 1)
        check_range("horizon.delta_h", self.delta_h, 0)
        check_range("horizon.delta_k", self.delta_k, 1)
        check_range("horizon.segment_start", self.segment_start, 0.0)
        if self.segment_end <= self.segment_start:
            fail(
                "horizon.segment_end",
                self.segment_end,
                f"a value greater than segment_start ({self.segment_start})",
            )
        if self.segment_unit == "fraction":
            check_range("horizon.segment_end", self.segment_end, 0.0, 1.0, lo_open=True)
        check_range("horizon.adaptive_threshold", self.adaptive_threshold, 0.0, lo_open=True)
        check_range("horizon.adaptive_window", self.adaptive_window, 1)
        check_range("horizon.adaptive_patience", self.adaptive_patience, 1)
        check_range("horizon.adaptive_growth", self.adaptive_growth, 1)
        check_range("horizon.adaptive_min_steps_between", self.adaptive_min_steps_between, 1)
        check_range("horizon.adaptive_max_steps_between", self.adaptive_max_steps_between, 1)
        check_range("horizon.adaptive_ema", self.adaptive_ema, 0.0, 1.0, lo_open=True)


@dataclass(kw_only=True)
class LossConfig:
    """The OPD objective: policy gradient on the log-ratio plus an optional top-K KL term."""

    gamma: float = 0.0
    """Discount of the return-to-go (Eq. 5): 0 is token-level OPD (paper default), 1 is sequence-level."""
    pg_coef: float = 1.0
    """Weight of the policy-gradient term -sg(A_t) * log p_student(y_t)."""
    topk_kl_coef: float = 0.0
    """Weight of the reverse-KL term over the top-K tokens (teacher.topk, teacher.topk_strategy)."""
    topk_renormalize: bool = True
    """Renormalise both distributions over the K tokens before the KL (true) or use the raw masses."""
    full_kl_coef: float = 0.0
    """Weight of the exact reverse KL(student || teacher) over the whole vocabulary at every distilled token
    (sum_v p_S (log p_S - log p_T)); needs teacher.backend 'megatron', the only teacher whose full distribution
    the loss sees (computed over vocabulary tiles, loss/two_model.py)."""
    normalization: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    """token_mean: divide by the global count of distilled tokens; sequence_mean: mean over sequences of each
    sequence's token mean; constant: divide by loss.normalization_constant (e.g. T_max times batch)."""
    normalization_constant: float = 1.0
    """Divisor for normalization='constant'."""
    impl: Literal["auto", "reference", "chunked", "triton"] = "auto"
    """Loss implementation: the fp32 reference, chunked pure torch, the fused Triton kernel, or auto (Triton on
    CUDA, chunked otherwise)."""
    chunk_size: int = 1024
    """Tokens per chunk in the chunked and fused paths."""
    fp8_lm_head: bool = False
    """Run the LM-head gradient GEMMs of the chunked/triton path in FP8 (Hopper GPUs; adapter ``fp8=True``).
    The logits stay bf16-in/fp32-out, so log p and the loss keep full accuracy (see loss/fp8.py)."""

    def __post_init__(self) -> None:
        check_range("loss.gamma", self.gamma, 0.0, 1.0)
        check_range("loss.pg_coef", self.pg_coef, 0.0)
        check_range("loss.topk_kl_coef", self.topk_kl_coef, 0.0)
        check_range("loss.full_kl_coef", self.full_kl_coef, 0.0)
        check_range("loss.normalization_constant", self.normalization_constant, 0.0, lo_open=True)
        check_range("loss.chunk_size", self.chunk_size, 1)
        if self.fp8_lm_head and self.impl == "reference":
            fail(
                "loss.fp8_lm_head",
                True,
                "false with loss.impl 'reference' (which computes the full logits and has no FP8 GEMM), or set "
                "loss.impl to 'chunked', 'triton' or 'auto'",
            )
        if self.pg_coef == 0.0 and self.topk_kl_coef == 0.0 and self.full_kl_coef == 0.0:
            fail(
                "loss.pg_coef",
                0.0,
                "a positive value (or set loss.topk_kl_coef or loss.full_kl_coef > 0): the loss would be zero",
            )


@dataclass(kw_only=True)
class OptimizerConfig:
    """Adam, its learning-rate schedule and gradient clipping (Megatron's names)."""

    optimizer: Literal["adam"] = "adam"
    """Optimizer (Adam with decoupled weight decay, as Megatron's 'adam')."""
    lr: float = 1e-6
    """Peak learning rate (paper: 1e-6)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_warmup_steps: int = 0
    """Linear warmup steps."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warmup."""
    lr_decay_steps: int | None = None
    """Steps over which the LR decays; None uses the run's total steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""

    def __post_init__(self) -> None:
        check_range("optimizer.lr", self.lr, 0.0, lo_open=True)
        check_range("optimizer.min_lr", self.min_lr, 0.0, self.lr)
        check_range("optimizer.lr_warmup_steps", self.lr_warmup_steps, 0)
        check_range("optimizer.lr_decay_steps", self.lr_decay_steps, 1)
        check_range("optimizer.weight_decay", self.weight_decay, 0.0)
        check_range("optimizer.adam_beta1", self.adam_beta1, 0.0, 1.0, hi_open=True)
        check_range("optimizer.adam_beta2", self.adam_beta2, 0.0, 1.0, hi_open=True)
        check_range("optimizer.adam_eps", self.adam_eps, 0.0, lo_open=True)
        check_range("optimizer.clip_grad", self.clip_grad, 0.0)


@dataclass(kw_only=True)
class TrainConfig:
    """Batching, length of the run, data and seeds."""

    data_path: str | None = None
    """Prompt dataset (jsonl or parquet) with a prompt and a ground-truth answer per row."""
    prompt_key: str = "prompt"
    """Row field holding the prompt (a string or a chat message list, as in DAPO-Math-17K)."""
    answer_key: str = "answer"
    """Row field holding the ground-truth answer (dotted paths such as 'reward_model.ground_truth' work)."""
    apply_chat_template: bool = True
    """Format prompts with the tokenizer's chat template when it has one."""
    global_batch_size: int = 64
    """Prompts per optimizer step, summed over data-parallel ranks (paper: 64)."""
    n_samples_per_prompt: int = 4
    """Rollouts per prompt (paper: 4)."""
    micro_batch_size: int = 4
    """Rollouts per forward/backward micro-batch on each data-parallel rank."""
    epochs: int = 2
    """Passes over the prompt dataset (paper: 2)."""
    train_steps: int | None = None
    """Stop after this many optimizer steps; None runs all epochs."""
    seed: int = 1234
    """Seed of data order, sampling and initialisation."""
    max_consecutive_nonfinite_steps: int = 3
    """Skip a step whose loss or gradients are NaN/inf; stop the run after this many in a row."""

    def __post_init__(self) -> None:
        check_range("train.global_batch_size", self.global_batch_size, 1)
        check_range("train.n_samples_per_prompt", self.n_samples_per_prompt, 1)
        check_range("train.micro_batch_size", self.micro_batch_size, 1)
        check_range("train.epochs", self.epochs, 1)
        check_range("train.train_steps", self.train_steps, 1)
        check_range("train.max_consecutive_nonfinite_steps", self.max_consecutive_nonfinite_steps, 1)


@dataclass(kw_only=True)
class EvalConfig:
    """Periodic evaluation: full rollouts, answers checked with math-verify."""

    eval_interval: int = 0
    """Evaluate every N optimizer steps; 0 disables periodic evaluation."""
    datasets: list[str] = field(default_factory=lambda: ["aime24", "aime25", "amc23"])
    """Benchmarks by name (shipped: aime24, aime25, amc23, math500) or paths to jsonl files."""
    n_samples: int = 16
    """k of avg@k and pass@k (paper: avg@16)."""
    temperature: float = 1.0
    """Sampling temperature at evaluation (the paper samples at 1.0)."""
    top_p: float = 1.0
    """Nucleus mass at evaluation."""
    max_new_tokens: int | None = None
    """Response budget at evaluation; None means rollout.max_response_length (full rollouts, as the paper)."""
    max_problems: int | None = None
    """Evaluate on the first N problems of each set only (for quick checks)."""
    at_start: bool = False
    """Evaluate the student once before the first step (the 'before' number)."""
    at_end: bool = True
    """Evaluate the student after the last step (when any evaluation is configured)."""
    eval_teacher: bool = False
    """Also evaluate the teacher once at start, to print it next to the student."""

    def __post_init__(self) -> None:
        check_range("eval.eval_interval", self.eval_interval, 0)
        check_range("eval.n_samples", self.n_samples, 1)
        check_range("eval.temperature", self.temperature, 0.0)
        check_range("eval.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_range("eval.max_new_tokens", self.max_new_tokens, 1)
        check_range("eval.max_problems", self.max_problems, 1)


@dataclass(kw_only=True)
class LoggingConfig:
    """What the user sees: console, progress bars and TensorBoard."""

    log_interval: int = 1
    """Print a metrics line every N steps."""
    log_dir: str | None = None
    """Where metrics.jsonl and the resolved config are written; None uses checkpoint.save (or writes none)."""
    tensorboard_dir: str | None = None
    """TensorBoard event directory; None puts it under checkpoint.save/tensorboard, or disables it."""
    progress_bar: bool = True
    """Show a progress bar per step phase (rollout, teacher, train, sync)."""
    kl_position_buckets: int = 10
    """Number of equal-width buckets of response positions [0, rollout.max_response_length) for the logged KL and
    log-ratio by position (``opd_by_position/{kl,topk_kl,log_ratio,tokens}_bNN``); the same positions at every
    step whatever the horizon, so buckets past the window are left out (see loss/metrics.py)."""

    def __post_init__(self) -> None:
        check_range("logging.log_interval", self.log_interval, 1)
        check_range("logging.kl_position_buckets", self.kl_position_buckets, 1)


@dataclass(kw_only=True)
class CheckpointConfig:
    """Saving and resuming (Megatron's --save/--load)."""

    save: str | None = None
    """Directory for checkpoints (iter_XXXXXXX folders and a 'latest' marker)."""
    load: str | None = None
    """Directory to resume from (its newest intact checkpoint). It must exist: a path that does not is an error
    (a typo must not start a run from scratch)."""
    allow_empty_load: bool = False
    """Start from the initial weights when ``load`` exists but holds no complete checkpoint (a job that resumes
    itself with load = save, killed before its first save). False: such a folder is an error."""
    save_interval: int = 0
    """Save every N steps; 0 saves only at the end of the run."""
    keep_last: int = 2
    """How many checkpoints to keep; older ones are deleted after a newer one is complete."""
    load_optimizer: bool = True
    """Restore optimizer state when loading (false: weights only, a warning is logged)."""

    def __post_init__(self) -> None:
        check_range("checkpoint.save_interval", self.save_interval, 0)
        check_range("checkpoint.keep_last", self.keep_last, 1)


@dataclass(kw_only=True)
class OPDConfig:
    """A whole run. Sections are addressed as ``section.field`` in YAML and on the command line."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The student."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Process-group layout."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Student generation."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Teacher scoring."""
    horizon: HorizonConfig = field(default_factory=HorizonConfig)
    """Horizon schedule."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Objective."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and LR schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batches, data, seeds."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""

    def __post_init__(self) -> None:
        if self.horizon.schedule == "segment" and self.horizon.segment_unit == "tokens":
            if self.horizon.segment_end > self.rollout.max_response_length:
                fail(
                    "horizon.segment_end",
                    self.horizon.segment_end,
                    f"at most rollout.max_response_length ({self.rollout.max_response_length})",
                )
        if self.horizon.schedule == "progressive" and self.horizon.h0 > self.rollout.max_response_length:
            fail(
                "horizon.h0",
                self.horizon.h0,
                f"at most rollout.max_response_length ({self.rollout.max_response_length})",
            )
        if self.loss.topk_kl_coef > 0 and self.teacher.topk == 0:
            fail("teacher.topk", 0, "a positive K when loss.topk_kl_coef > 0")
        if self.loss.full_kl_coef > 0 and self.teacher.backend != "megatron":
            fail(
                "loss.full_kl_coef",
                self.loss.full_kl_coef,
                "0 unless teacher.backend is 'megatron' (the other teachers return K logprobs per token, not the "
                "whole distribution)",
            )

    def check_world_size(self, world_size: int) -> int:
        """Validate the layout and batch sizes for ``world_size`` ranks; return the data-parallel size."""
        dp = self.parallel.resolve_data_parallel_size(world_size)
        rollouts = self.train.global_batch_size * self.train.n_samples_per_prompt
        per_rank = self.train.micro_batch_size * dp
        if rollouts % per_rank:
            raise ConfigError(
                f"global_batch_size ({self.train.global_batch_size}) x n_samples_per_prompt "
                f"({self.train.n_samples_per_prompt}) = {rollouts} rollouts is not divisible by micro_batch_size "
                f"({self.train.micro_batch_size}) x data-parallel size ({dp}) = {per_rank}; "
                "change one of them so each rank gets whole micro-batches"
            )
        return dp

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
