"""The OPD loss: ``reference.py`` is the specification; fused paths are checked against it."""
