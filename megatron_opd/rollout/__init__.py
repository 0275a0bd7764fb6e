"""Rollout engines: the student samples horizon-truncated responses here.

- ``types.py``: ``RolloutResult`` (what every engine returns) and ``RolloutError`` (a batch that could not complete).
- ``engine.py``: the ``RolloutEngine`` protocol, the factory ``build_rollout_engine`` and ``check_served_model``.
  (Nothing here imports ``teacher/``; the teacher builds on this package.)
- ``decoder.py`` + ``embedded.py``: the in-process engine (CPU default) on HF-named weights.
- ``sglang_client.py``, ``sglang_engine.py``, ``sglang_weights.py``, ``sglang_server.py``: the SGLang backend (HTTP
  client, engine, weight sync, server launcher).
- ``tiny_model.py``: a random tiny HF model + tokenizer for tests and benchmarks.
"""
