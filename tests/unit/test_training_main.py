"""training/main.py: --help answers at once, before Megatron and the model code are imported."""

import subprocess
import sys

_HELP = """
import runpy, sys
sys.argv = ["megatron_opd.training.main", "--help"]
try:
    runpy.run_module("megatron_opd.training.main", run_name="__main__")
except SystemExit as e:
    assert e.code == 0, e.code
print("MEGATRON_LOADED" if "megatron.core" in sys.modules else "MEGATRON_NOT_LOADED")
"""


def test_help_does_not_import_megatron_and_prints_no_warnings():
    proc = subprocess.run([sys.executable, "-c", _HELP], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--train.global_batch_size" in proc.stdout
    assert proc.stdout.strip().endswith("MEGATRON_NOT_LOADED")
    assert proc.stderr == ""
