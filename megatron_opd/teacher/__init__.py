"""Teacher scoring of student rollouts: ``scorer.py`` (``TeacherScores``, the ``TeacherScorer`` protocol),
``embedded.py`` (in-process prefill), ``sglang_scorer.py`` (prefill-only requests to SGLang servers), ``vocab.py``
(the teacher/student vocabulary check)."""
