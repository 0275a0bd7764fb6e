"""Start and stop SGLang server processes (student and teacher) and wait until they answer /health.

Why it exists: tests, CPU runs and single-node GPU runs need servers started from Python with the right flags and
environment, and stopped for sure afterwards. SGLang runs in its own virtualenv (``make sglang-env`` builds
``.venv-sglang``; it pins a torch different from the trainer's), so servers are subprocesses of that interpreter.

CPU (``device="cpu"``): float32 (the default float16 KV cache moved logprobs by up to 0.07 vs fp32 HF), a small
``--max-total-tokens`` (else SGLang reserves most of RAM), loopback host, ``SGLANG_USE_CPU_ENGINE=1`` and the
placeholder ``sgl_kernel`` of ``requirements/sglang_stubs`` on PYTHONPATH (see the team notes shared/notes/sglang-on-cpu.md).

``--skip-tokenizer-init`` by default: the trainer tokenizes and every request carries ``input_ids``, so the server
needs no tokenizer (EOS comes from the model's generation config). It also sidesteps transformers 5.19 (in
.venv-sglang) loading any ``model_type: qwen2`` tokenizer as ``Qwen2Tokenizer``, which rebuilt a word-level test
tokenizer into one that encodes SGLang's warm-up text to zero tokens and crashed the server.

Always ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``: SGLang otherwise reports logprobs of the temperature-scaled
distribution, while ``RolloutResult.logprobs`` are defined at temperature 1 (what the trainer computes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

import requests

__all__ = ["SGLangServer", "default_sglang_python", "free_port"]

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUBS_DIR = os.path.join(_REPO, "requirements", "sglang_stubs")


def default_sglang_python() -> str | None:
    """The interpreter of ``.venv-sglang`` ($OPD_SGLANG_PYTHON overrides), or None when it is not built."""
    env = os.environ.get("OPD_SGLANG_PYTHON")
    if env:
        return env if os.path.exists(env) else None
    path = os.path.join(_REPO, ".venv-sglang", "bin", "python")
    return path if os.path.exists(os.path.join(_REPO, ".venv-sglang", ".installed")) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs the server command as its child (in the same process group) and SIGKILLs the whole group once the process
# that started it is gone, so a SIGKILLed trainer leaves no server holding memory or a GPU. It polls its parent
# pid rather than using PR_SET_PDEATHSIG, which would fire when the *thread* that started it ends (the trainer
# starts its servers from short-lived threads). SIGTERM (stop()) reaches the server through the group; the guard
# ignores it and exits with the server's status. Standard library only: it runs in SGLang's interpreter.
_GUARD = """
import os, signal, subprocess, sys
parent = int(sys.argv[1])
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(sys.argv[2:], preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
while True:
    try:
        rc = child.wait(timeout=1.0)
        sys.exit(rc if rc >= 0 else 128 - rc)
    except subprocess.TimeoutExpired:
        if os.getppid() != parent:
            os.killpg(0, signal.SIGKILL)
"""


class SGLangServer:
    """One ``sglang.launch_server`` process. Use as a context manager, or ``start()`` / ``stop()``.

    The server runs under a small guard process that kills it (and its scheduler/detokenizer children) when the
    process that called ``start()`` dies, even by SIGKILL. ``env``: variables set in the server's environment over
    the inherited ones (e.g. ``OMP_NUM_THREADS``, the server's torch thread count on CPU, for a comparison that
    gives both sides the same threads).
    """

    def __init__(
        self,
        model_path: str,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        device: str = "cpu",
        dtype: str = "float32",
        max_total_tokens: int | None = 4096,
        tp_size: int = 1,
        skip_tokenizer_init: bool = True,
        extra_args: Sequence[str] = (),
        python: str | None = None,
        log_path: str | None = None,
        env: Mapping[str, str] | None = None,
    ):
        self.python = python or default_sglang_python()
        if self.python is None:
            raise FileNotFoundError(
                "SGLang environment not found: run `make sglang-env` (builds .venv-sglang)"
            )
        self.model_path = model_path
        self.host, self.port = host, port or free_port()
        self.device, self.dtype, self.tp_size = device, dtype, tp_size
        self.max_total_tokens = max_total_tokens
        self.skip_tokenizer_init = skip_tokenizer_init
        self.extra_args = list(extra_args)
        self.log_path = log_path
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "sglang.launch_server", "--model-path", self.model_path]
        cmd += ["--host", self.host, "--port", str(self.port), "--device", self.device, "--dtype", self.dtype]
        cmd += ["--tp-size", str(self.tp_size)]
        if self.max_total_tokens:
            cmd += ["--max-total-tokens", str(self.max_total_tokens)]
        if self.skip_tokenizer_init:
            cmd.append("--skip-tokenizer-init")
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
        if self.device == "cpu":
            env["SGLANG_USE_CPU_ENGINE"] = "1"
            env["PYTHONPATH"] = os.pathsep.join(p for p in (STUBS_DIR, env.get("PYTHONPATH", "")) if p)
        env.update(self.env)
        return env

    def start(self, timeout_s: float = 300.0) -> SGLangServer:
        """Launch and block until /health answers 200; raises with the log tail if the process dies or times out."""
        self._log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.python, "-c", _GUARD, str(os.getpid()), *self.command()],
            env=self.environment(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches the scheduler/detokenizer children
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"SGLang server for {self.model_path} exited ({self.proc.returncode}){self._tail()}"
                )
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"SGLang server {self.url} not healthy after {timeout_s:.0f} s{self._tail()}")

    def _tail(self) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return "; log tail:\n" + "".join(f.readlines()[-20:])

    def kill(self) -> None:
        """SIGKILL the whole server process group at once (tests use it to simulate a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL after ``grace_s``."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
            self._log = None

    def __enter__(self) -> SGLangServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover - manual use: python -m megatron_opd.rollout.sglang_server DIR
    srv = SGLangServer(sys.argv[1], port=int(sys.argv[2]) if len(sys.argv) > 2 else None).start()
    print(srv.url, flush=True)
    try:
        signal.pause()
    finally:
        srv.stop()
