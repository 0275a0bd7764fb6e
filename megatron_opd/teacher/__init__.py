"""Teacher scoring of student rollouts: ``scorer.py`` (``TeacherScores``, the ``TeacherScorer`` protocol),
``embedded.py`` (in-process prefill), ``sglang_scorer.py`` (prefill-only requests to SGLang servers),
``megatron.py`` (the forward-only teacher inside the train step), ``factory.py`` (``build_teacher_scorer``),
``vocab.py`` (the teacher/student vocabulary check)."""
