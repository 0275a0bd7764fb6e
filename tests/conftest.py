"""Process-wide test settings that must hold before any test module is imported.

TRITON_INTERPRET is read when triton is first imported (triton.language builds its own @jit helpers then), and
megatron.core imports triton. The Triton loss tests run interpreted on CPU only if the variable is set before
the first test module that imports megatron.core, so it is set here.
"""

from megatron_opd.parallel.cpu_compat import use_triton_interpreter

use_triton_interpreter()
