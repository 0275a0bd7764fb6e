"""Helper processes die with the process that started them, even when it is SIGKILLed.

Why it exists: a killed trainer (preemption, the OOM killer, the kill-and-resume tests) runs no clean-up, and
Linux hands its children to init. Megatron's checkpoint saving starts a ``multiprocessing`` Manager with the
'spawn' method (the queue of its file writers), which then lives on, about 400 MB each, and on a GPU node holds
device memory and blocks the restart. ``PR_SET_PDEATHSIG`` asks the kernel to SIGKILL a process when its parent
dies. Megatron also forks its file writers, which a kill during a save leaves blocked (and holding the Manager's
resource tracker alive). Multiprocessing runs the parent's main module as ``__mp_main__`` in every 'spawn'
child, so an entry point calls ``bind_child_processes(__name__)`` at import: the trainer's spawned helpers bind
themselves to it there, and an ``os.register_at_fork`` hook binds the ones it forks.

The kernel ties the signal to the parent *thread*: only children forked or spawned from the main thread are
bound (the trainer saves checkpoints on its main thread). ``subprocess`` children (SGLang servers) are not
forked through Python and are not covered here.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

__all__ = ["PARENT_ENV", "bind_child_processes", "die_with_parent"]

# The pid a spawned child must find as its parent; a different one means the parent died before the child bound
# itself to it (the child was already re-parented).
PARENT_ENV = "MEGATRON_OPD_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies. Linux only; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    return True


def bind_child_processes(module_name: str) -> None:
    """Call at import in an entry point's main module with its ``__name__``.

    As the entry point (``__main__``) or a multiprocessing 'spawn' child of it (``__mp_main__``, which first
    binds itself to its parent, and exits at once if the parent is already gone): the children this process
    forks from its main thread die with it (Megatron's file writers are forked there), and the children it
    spawns bind themselves to it when they import this module. Any other ``module_name``: nothing.
    """
    if module_name not in ("__main__", "__mp_main__"):
        return
    if module_name == "__mp_main__":
        die_with_parent()
        expected = os.environ.get(PARENT_ENV)
        if expected and expected.isdigit() and os.getppid() != int(expected):
            os._exit(1)  # the parent died before the line above took effect
    os.environ[PARENT_ENV] = str(os.getpid())
    global _fork_hook_installed
    if not _fork_hook_installed:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _fork_hook_installed = True


_fork_hook_installed = False
_fork = threading.local()


def _before_fork() -> None:
    # In the parent, on the forking thread. A child forked from another thread would be signalled when that
    # thread ends, not the process: it is left unbound.
    _fork.parent = os.getpid() if threading.current_thread() is threading.main_thread() else None


def _after_fork_in_child() -> None:
    parent = getattr(_fork, "parent", None)
    if parent is None:
        return
    die_with_parent()
    if os.getppid() != parent:
        os._exit(1)  # the parent died between the fork and the line above
