"""LLM distillation analyses of the paper's Section 6: where teacher and student disagree (Fig. 13) and whether
teacher prefixes alone help the student (Fig. 9/10). They run on any rollout engine and teacher scorer, so the
same code serves the CPU toy models and real checkpoints; ``tools/position_kl.py`` and
``tools/prefix_continuation.py`` are their command lines."""
