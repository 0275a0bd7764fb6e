"""Spawned helpers die with a SIGKILLed parent (issue 16 item 10), and the kill check (kill_resume.kill_run) finds
the ones that do not: a parent that starts helpers the way Megatron's checkpoint saving does (a 'spawn'
multiprocessing Manager, plus a spawned worker) is killed with and without ``bind_child_processes``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_opd.utils.kill_resume import HarnessError, kill_run, marked_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PARENT = """
import multiprocessing as mp
import sys
import time

from megatron_opd.utils.lifeline import bind_child_processes

if {bind}:
    bind_child_processes(__name__)


def sleeper():
    time.sleep(600)


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()  # as megatron's filesystem_async writer queue
    queue = manager.Queue()
    worker = ctx.Process(target=sleeper)
    worker.start()
    forked = mp.get_context("fork").Process(target=sleeper)  # as megatron's file writers
    forked.start()
    print("ready", flush=True)
    time.sleep(600)
"""


def _start(tmp_path, bind: bool):
    script = tmp_path / f"parent_{bind}.py"
    script.write_text(textwrap.dedent(PARENT.format(bind=bind)))
    env, marker = marked_env({**os.environ, "PYTHONPATH": ROOT})
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # the spawned children have finished importing the parent's module by now (or soon after)
    return proc, marker


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_spawned_helpers_die_with_a_killed_parent(tmp_path):
    proc, marker = _start(tmp_path, bind=True)
    helpers = kill_run(proc, marker, grace_s=30)
    assert helpers >= 4  # the Manager, the spawned worker, the forked one, multiprocessing's resource tracker


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_kill_check_names_helpers_that_outlive_their_parent(tmp_path):
    proc, marker = _start(tmp_path, bind=False)
    with pytest.raises(HarnessError, match=r"process\(es\) of the killed run outlived it by 3 s: ") as e:
        kill_run(proc, marker, grace_s=3)  # kill_run also kills the survivors it names, for the next tests
    assert "spawn_main" in str(e.value) and "parent_False.py" in str(e.value)  # spawned and forked ones
