"""HTTP client for one or more SGLang servers: concurrency limit, timeouts, retries with backoff, all-or-nothing.

Why it exists: rollouts and teacher scoring send thousands of independent requests per step. They must run many
at a time, spread over servers (a client-side list; an ``sglang-router`` URL is just a one-element list), survive a
transient failure by retrying elsewhere, and, when a server is really gone, fail the whole batch with an error
naming the URL: a silently dropped or half-scored sample would bias the OPD gradient without a trace.

Threads (not asyncio): the trainer is synchronous, `requests` is already a dependency, and the GIL is released
while waiting on sockets, which is all these threads do.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from operator import itemgetter
from typing import Any

import numpy as np
import requests

from megatron_opd.rollout.types import RolloutError

__all__ = ["SGLangClient", "logprob_arrays", "redact_url"]


def logprob_arrays(rows: Sequence[Any], name: str, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logprobs float32, token ids int64) of SGLang logprob entries ``[logprob, token id, text or None]``.

    ``width`` None: ``rows`` is [T] entries -> two [T] arrays (``output_token_logprobs``...). Else ``rows`` is
    [T] lists of entries (``output_top_logprobs``...), each with at least ``width`` entries, of which the first
    ``width`` are kept -> two [T, width] arrays. One C-level pass per field (``np.fromiter`` over ``itemgetter``):
    no Python object per token is made, and no per-token Python loop runs (about 70 ns an entry, a small part of
    what decoding the JSON cost). A malformed entry (missing, null, not a number) raises RolloutError naming
    ``name``.
    """
    T = len(rows)
    try:
        if width is None:
            flat: Sequence[Any] = rows
        else:
            lens = set(map(len, rows))
            if lens and min(lens) < width:
                raise RolloutError(f"SGLang {name}: a position has {min(lens)} entries, expected {width}")
            chunks = rows if lens <= {width} else (r[:width] for r in rows)
            flat = list(itertools.chain.from_iterable(chunks))
        n = len(flat)
        lps = np.fromiter(map(itemgetter(0), flat), dtype=np.float32, count=n)
        ids = np.fromiter(map(itemgetter(1), flat), dtype=np.int64, count=n)
    except (TypeError, ValueError, IndexError) as e:
        raise RolloutError(f"SGLang {name}: malformed logprob entry ({type(e).__name__}: {e})") from None
    if np.isnan(lps).any():  # np.fromiter reads a null logprob as NaN; float(None) used to raise
        raise RolloutError(
            f"SGLang {name}: null or NaN logprob at position {int(np.isnan(lps).argmax()) // (width or 1)}"
        )
    if width is not None:
        lps, ids = lps.reshape(T, width), ids.reshape(T, width)
    return lps, ids


def redact_url(url: str) -> str:
    """``url`` without credentials (``http://user:token@host`` -> ``http://***@host``), for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return f"{scheme}://{netloc}{slash}{path}"


def _short_error(e: BaseException) -> str:
    """``requests``' error in one short line: the OS reason (``[Errno 111] Connection refused``) instead of
    urllib3's nested repr of the connection pool."""
    text = str(e)
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if errno:
        text = errno.group(0)
    text = re.sub(r"^\w+ConnectionPool\([^)]*\): ", "", text)
    return f"{type(e).__name__}: {text[:200]}"


class _Fatal(Exception):
    """A response that retrying cannot fix (4xx: the request itself is wrong)."""


class SGLangClient:
    """Calls SGLang's native HTTP API on ``urls``.

    ``max_concurrency`` requests in flight per server; ``timeout_s`` per attempt; ``max_retries`` further attempts
    per request, each after ``backoff_s * 2**attempt`` seconds. Each attempt goes to the server with the fewest
    requests outstanding from this client (ties in turn), a retry to one not yet tried for that request while
    there is one: a slow or dead server stops drawing work, and the others absorb it.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        max_concurrency: int = 64,
        timeout_s: float = 600.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        role: str = "",
    ):
        if not urls:
            raise ValueError("SGLang backend needs at least one server URL")
        self.role = role  # 'rollout' or 'teacher': named in every error, so a dead teacher is told from a dead student
        self.urls = [u.rstrip("/") for u in urls]
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._local = threading.local()
        self._next = 0
        self._lock = threading.Lock()
        self.outstanding = dict.fromkeys(self.urls, 0)  # requests in flight per server (dispatch, tests)

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def _post_once(self, url: str, path: str, payload: dict[str, Any], timeout_s: float) -> Any:
        r = self._session().post(url + path, json=payload, timeout=timeout_s)
        if 400 <= r.status_code < 500:
            raise _Fatal(f"HTTP {r.status_code}: {r.text[:500]}")
        r.raise_for_status()
        if "json" not in r.headers.get("content-type", ""):
            return {"text": r.text}  # some control routes (/flush_cache) answer plain text
        return r.json()

    def _acquire(self, tried: set[str]) -> str:
        """The server with the fewest outstanding requests (not yet ``tried`` if any is left), now one more."""
        with self._lock:
            pool = [u for u in self.urls if u not in tried] or self.urls
            n = len(self.urls)
            # Scan from a rotating start so equal loads take turns instead of all landing on the first URL.
            order = [self.urls[(self._next + i) % n] for i in range(n)]
            target = min((u for u in order if u in pool), key=lambda u: self.outstanding[u])
            self._next = (self.urls.index(target) + 1) % n
            self.outstanding[target] += 1
            return target

    def _release(self, target: str) -> None:
        with self._lock:
            self.outstanding[target] -= 1

    def post(
        self,
        path: str,
        payload: dict[str, Any],
        *,
        url: str | None = None,
        timeout_s: float | None = None,
        retry: bool = True,
    ) -> Any:
        """POST with retries. ``url`` pins one server (weight updates); otherwise the least loaded server takes
        it. ``retry=False``: one attempt only, for collective routes (a blind retry could hang the group)."""
        timeout_s = timeout_s or self.timeout_s
        pinned = None if url is None else self.urls[self.urls.index(url.rstrip("/"))]
        attempts = self.max_retries + 1 if retry else 1
        who = " ".join(filter(None, ("SGLang", self.role, "server")))
        errors: list[tuple[str, BaseException]] = []
        tried: set[str] = set()
        for attempt in range(attempts):
            target = pinned or self._acquire(tried)
            tried.add(target)
            try:
                return self._post_once(target, path, payload, timeout_s)
            except _Fatal as e:
                raise RolloutError(f"{who} {redact_url(target)}{path} rejected the request: {e}") from None
            except (requests.RequestException, ValueError) as e:
                errors.append((redact_url(target), e))
            finally:
                if pinned is None:
                    self._release(target)
            if attempt < attempts - 1:
                time.sleep(self.backoff_s * 2**attempt)
        last_url, last = errors[-1]
        kinds: dict[str, int] = {}
        for _, e in errors:
            kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
        raise RolloutError(
            f"{who} request {path} failed after {len(errors)} attempt{'s' if len(errors) > 1 else ''}; last error "
            f"from {last_url}: {_short_error(last)}; tried {', '.join(sorted({u for u, _ in errors}))} "
            f"({timeout_s:g} s timeout each, backoff from {self.backoff_s:g} s doubling); errors: "
            f"{', '.join(f'{n}x {k}' for k, n in kinds.items())}"
        )

    def map(
        self,
        path: str,
        payloads: Sequence[dict[str, Any]],
        parse: Callable[[int, Any], Any] | None = None,
    ) -> list[Any]:
        """POST every payload (spread over servers, at most ``max_concurrency`` per server in flight).

        ``parse(i, response)`` (optional) runs in the worker thread as soon as payload ``i``'s response arrives,
        so turning JSON into arrays overlaps with the requests still in flight instead of following the whole
        batch; its exception (a malformed answer) fails the batch like a failed request, without a retry.
        Returns the (parsed) responses in payload order, or raises ``RolloutError`` if any request finally fails;
        the requests not yet started are then cancelled. Never returns a partial list.
        """
        if not payloads:
            return []

        def one(i: int, payload: dict[str, Any]) -> Any:
            out = self.post(path, payload)
            return out if parse is None else parse(i, out)

        workers = min(len(payloads), self.max_concurrency * len(self.urls))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sglang")
        try:
            futures = [pool.submit(one, i, p) for i, p in enumerate(payloads)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f.done() and f.exception() is not None:
                    raise f.exception()
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def post_all(
        self,
        path: str,
        payload: dict[str, Any],
        *,
        timeout_s: float | None = None,
        retry: bool = True,
    ) -> list[Any]:
        """The same POST to every server in parallel (flush_cache, update_weights_from_disk...)."""
        with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            futs = [
                pool.submit(self.post, path, payload, url=u, timeout_s=timeout_s, retry=retry)
                for u in self.urls
            ]
            return [f.result() for f in futs]

    def get(self, path: str, *, url: str, timeout_s: float = 5.0) -> requests.Response:
        return self._session().get(url.rstrip("/") + path, timeout=timeout_s)

    def health(self) -> bool:
        """True when every server answers /health with 200."""
        for u in self.urls:
            try:
                if self.get("/health", url=u).status_code != 200:
                    return False
            except requests.RequestException:
                return False
        return True
