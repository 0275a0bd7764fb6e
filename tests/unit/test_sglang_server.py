"""A server started by ``SGLangServer`` (and its children) dies with the process that started it, even when that
process is SIGKILLed and started it from a thread that has ended (as ``run._launch_servers`` does); ``stop()``
still ends the server (issue 16 item 10). A stand-in server (a tiny HTTP server with one child process) replaces
``sglang.launch_server``, so no SGLang environment is needed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from megatron_opd.rollout.sglang_server import SGLangServer
from megatron_opd.utils.kill_resume import kill_run, marked_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Answers GET /health with 200 on 127.0.0.1:PORT; starts a child, as SGLang starts its scheduler.
STAND_IN = """
import subprocess, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class StandIn(SGLangServer):
    def command(self) -> list[str]:
        return [self.python, "-c", STAND_IN, str(self.port)]


PARENT = f"""
import sys, threading, time
sys.path.insert(0, {ROOT!r})
from tests.unit.test_sglang_server import StandIn
srv = StandIn("no-model", python=sys.executable)
t = threading.Thread(target=srv.start, kwargs={{"timeout_s": 120}})
t.start()
t.join()  # the starting thread is gone, as in run._launch_servers
print("ready", srv.proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups as on Linux")
def test_a_server_dies_with_the_killed_process_that_started_it(tmp_path):
    env, marker = marked_env({**os.environ, "PYTHONPATH": ROOT})
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(PARENT)], env=env, stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline().split()
    assert line and line[0] == "ready", line
    started = psutil.Process(int(line[1]))  # the process SGLangServer started (the guard)
    server_tree = [started, *started.children(recursive=True)]
    time.sleep(1.5)  # the guard has looked at its parent at least once while it was alive: it kept the server
    assert all(p.is_running() for p in server_tree)
    # kill_run raises naming any process of the run still alive 30 s after the kill (the stand-in server and
    # its child included: they were in the parent's tree when it was killed).
    assert kill_run(proc, marker, grace_s=30) >= 3


def test_stop_still_ends_the_server_and_its_children():
    srv = StandIn("no-model", python=sys.executable).start(timeout_s=120)
    tree = [psutil.Process(srv.proc.pid), *psutil.Process(srv.proc.pid).children(recursive=True)]
    srv.stop(grace_s=10)
    assert srv.proc.returncode is not None
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive


def test_env_reaches_the_server_process():
    """``env`` overrides the inherited environment of the launched process (bench_teacher's ``--threads``)."""
    srv = StandIn("no-model", python=sys.executable, env={"OMP_NUM_THREADS": "3", "OPD_TEST_MARK": "x"})
    assert srv.environment()["OMP_NUM_THREADS"] == "3"
    srv.start(timeout_s=120)
    try:
        procs = [psutil.Process(srv.proc.pid), *psutil.Process(srv.proc.pid).children(recursive=True)]
        envs = [p.environ() for p in procs]
    finally:
        srv.stop()
    assert len(envs) >= 2 and all(
        e.get("OMP_NUM_THREADS") == "3" and e.get("OPD_TEST_MARK") == "x" for e in envs
    )
