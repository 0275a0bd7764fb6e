"""The paper's two control tasks (Section 3.1, Appendix D), distilled with the project's own OPD algorithms.

Why it exists: on a 2D navigation task everything runs on a CPU in minutes, so the claims that decide how the
LLM trainer is used (token-level beats sequence-level OPD under teacher-student mismatch, POPD converges in
fewer steps, TOPD fails when the teacher's behaviour is phase-dependent) can be checked end to end with the
very horizon schedules (``algorithms.horizon``), advantages (``algorithms.advantage``) and loss
(``loss.reference.opd_loss``) the LLM path uses. Only the per-step log-probability differs: a 2D Gaussian over
continuous actions instead of a softmax over tokens, giving the same [B, T] tensors.

Modules: ``gaussian`` (the Gaussian action head and its log-prob), ``envs`` (the two vectorised tasks),
``policies`` (Table 4 MLP, Table 5 Transformer, the analytic optimal teacher), ``rollout`` (sampling
trajectories), ``training`` (REINFORCE pre-training, OPD/POPD/TOPD distillation, evaluation),
``experiments`` (Fig. 3, Table 2, Fig. 8, Fig. 14) and ``report`` (markdown tables and PNG plots).
"""
