"""The known, harmless start-up warnings of our dependencies, silenced once, here.

Why it exists: megatron-core warns at import time, from every process, that NVIDIA Apex and Transformer Engine are
missing and that it falls back to torch implementations (six or seven ``UserWarning``s before a run prints anything).
Apex is not on PyPI and the project never needs it; Transformer Engine is optional (GPU only) and the builders say
which layer spec a run uses. Only these exact messages are filtered: every other warning still shows.
"""

from __future__ import annotations

import warnings

# Regexes matched against the start of the warning message (warnings.filterwarnings semantics).
KNOWN_HARMLESS = (
    r"Transformer Engine and Apex are not installed\. Falling back",
    r"Apex is not installed\. Falling back to Torch Norm",
)


def silence_known_warnings() -> None:
    """Install the filters (idempotent: ``filterwarnings`` replaces an identical existing filter)."""
    for message in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
