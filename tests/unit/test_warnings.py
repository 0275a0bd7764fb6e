"""megatron_opd._warnings: the known import-time warnings of megatron-core are silenced, and nothing else is."""

import subprocess
import sys


def _stderr_of(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_megatron_import_is_quiet_after_the_package():
    # Without the filters these imports print the Apex / Transformer Engine fallbacks (checked just below).
    code = "import megatron_opd, megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs"
    assert "Apex" not in _stderr_of(code)


def test_megatron_import_warns_without_the_package():
    # The control: proves the test above could fail (the warnings exist on this install).
    code = "import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs"
    assert "Apex is not installed" in _stderr_of(code)


def test_other_warnings_still_show():
    code = "import megatron_opd, warnings; warnings.warn('Apex is fine but this one is not', UserWarning)"
    assert "this one is not" in _stderr_of(code)
