"""Markdown tables and PNG plots of the control reproduction, next to the paper's numbers.

Why it exists: the experiments return plain dicts (saved as JSON); this module turns them into what a reader
checks, without rerunning anything, so the committed docs can be regenerated from the committed JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_opd.control.experiments import (
    AR_OBSTACLE,
    best_success,
    final_success,
    mean_curve,
    steps_to_reach,
)

PAPER_TABLE2 = {"OPD": 1.00, "POPD": 1.00, "TOPD rho=0.25": 0.93, "TOPD rho=0.2": 0.00, "TOPD rho=0.1": 0.00}
"""Table 2 of the paper: success rate @avg256 at the best evaluation step."""
PAPER_FIG3 = {30: ("reaches", "reaches"), 45: ("reaches", "reaches"), 60: ("reaches", "fails")}
"""Fig. 3 of the paper, read from its caption (no numbers given): (token-level, sequence-level) outcome."""
PAPER_FIG3.update({75: ("reaches", "fails"), 90: ("reaches", "fails")})
SUCCESS_LEVEL = 0.9
"""'High success rate' for Fig. 8 and the steps-to-reach columns."""


def _mode(part: str, meta: dict[str, Any]) -> str:
    """The run's mode, with Table 2's distillation seeds when a reduced run recorded them."""
    seeds = meta.get("ar_seeds")
    return (
        f"{meta['mode']}, seeds {', '.join(map(str, seeds))}" if part == "table2" and seeds else meta["mode"]
    )


def _fmt_steps(xs: list[int | None]) -> str:
    return ", ".join("never" if x is None else str(x) for x in xs)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def fig3_table(fig3: dict[str, Any]) -> str:
    rows = [
        "| mismatch | token-level final success | sequence-level final success | token steps to 90% (per seed) "
        "| sequence steps to 90% (per seed) | paper (token / sequence) |",
        "|---|---|---|---|---|---|",
    ]
    for angle, rec in fig3["angles"].items():
        paper = PAPER_FIG3.get(int(angle), ("?", "?"))
        rows.append(
            f"| {angle} deg | {_pct(final_success(rec['token']))} | {_pct(final_success(rec['sequence']))} "
            f"| {_fmt_steps(steps_to_reach(rec['token'], SUCCESS_LEVEL))} "
            f"| {_fmt_steps(steps_to_reach(rec['sequence'], SUCCESS_LEVEL))} | {paper[0]} / {paper[1]} |"
        )
    return "\n".join(rows)


def fig14_table(fig14: dict[str, Any], fig3: dict[str, Any] | None) -> str:
    rows = [
        "| teacher | OPD variant | final success | steps to 90% (per seed) |",
        "|---|---|---|---|",
    ]
    for name in ("token", "sequence"):
        runs = fig14[name]
        rows.append(
            f"| analytic optimal | {name}-level | {_pct(final_success(runs))} | {_fmt_steps(steps_to_reach(runs, SUCCESS_LEVEL))} |"
        )
    key = str(int(fig14["angle"]))
    if fig3 is not None and key in fig3["angles"]:
        for name in ("token", "sequence"):
            runs = fig3["angles"][key][name]
            rows.append(
                f"| learned (REINFORCE) | {name}-level | {_pct(final_success(runs))} "
                f"| {_fmt_steps(steps_to_reach(runs, SUCCESS_LEVEL))} |"
            )
    return "\n".join(rows)


def table2_rules(t2: dict[str, Any]) -> str:
    """Table 2 under both success rules (``control.envs``): the goal disc entered at any step (``reach``, the
    table above) and the final position inside it at t = T (``final``); empty when the run predates the rule."""
    if not all("success_final" in r for runs in t2["methods"].values() for r in runs):
        return ""
    rows = [
        "| method | reach: best (seed mean) | reach: final | final position at t = T: best (seed mean) "
        "| final position: per seed best | final position: final | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in t2["methods"].items():
        per_seed = ", ".join(_pct(max(r["success_final"])) for r in runs)
        paper = PAPER_TABLE2.get(name)
        rows.append(
            f"| {name} | {_pct(best_success(runs))} | {_pct(final_success(runs))} "
            f"| {_pct(best_success(runs, 'success_final'))} | {per_seed} "
            f"| {_pct(final_success(runs, 'success_final'))} | {'-' if paper is None else _pct(paper)} |"
        )
    rules = [
        ("teacher", t2.get("teacher_success_rules")),
        ("initial student", t2.get("student_init_success_rules")),
    ]
    for who, rates in rules:
        if rates:
            rows.append(f"| {who} | {_pct(rates['reach'])} | | {_pct(rates['final'])} | | | |")
    return "\n".join(rows)


def table2(t2: dict[str, Any]) -> str:
    rows = [
        "| method | best success@avg256 (seed mean) | per seed best | final | steps to 90% (per seed) "
        "| env steps generated to 90% (per seed) | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in t2["methods"].items():
        per_seed = ", ".join(_pct(max(r["success"])) for r in runs)
        reach = steps_to_reach(runs, SUCCESS_LEVEL)
        env_reach = [
            None if s is None else r["env_steps"][r["eval_steps"].index(s)] for s, r in zip(reach, runs)
        ]
        paper = PAPER_TABLE2.get(name)
        rows.append(
            f"| {name} | {_pct(best_success(runs))} | {per_seed} | {_pct(final_success(runs))} | {_fmt_steps(reach)} "
            f"| {_fmt_steps(env_reach)} | {'-' if paper is None else _pct(paper)} |"
        )
    return "\n".join(rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_paths(ax, paths, color, alpha=0.6, lw=0.8):
    for p in paths:
        xs, ys = zip(*p)
        ax.plot(xs, ys, color=color, alpha=alpha, lw=lw)


def plot_fig3(fig3: dict[str, Any], path: Path) -> None:
    plt = _plt()
    angles = list(fig3["angles"])
    fig, axes = plt.subplots(3, len(angles), figsize=(3.2 * len(angles), 9.0), squeeze=False)
    for j, angle in enumerate(angles):
        rec = fig3["angles"][angle]
        for i, name in enumerate(("token", "sequence")):
            ax = axes[i][j]
            _draw_paths(ax, fig3["teacher_paths"], "0.6", alpha=0.5)
            _draw_paths(ax, rec["student_init_paths"], "tab:orange", alpha=0.4)
            _draw_paths(ax, rec[name][0]["paths"], "tab:blue" if name == "token" else "tab:red")
            ax.plot([8.0], [0.0], "k*", ms=10)
            ax.set_title(f"{angle} deg, {name}-level")
            ax.set_xlim(-3, 12)
            ax.set_ylim(-5, 10)
            ax.set_aspect("equal")
        ax = axes[2][j]
        for name, color in (("token", "tab:blue"), ("sequence", "tab:red")):
            runs = rec[name]
            ax.plot(runs[0]["eval_steps"], mean_curve(runs), color=color, label=f"{name}-level")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("OPD step")
        ax.set_ylabel("success (seed mean)")
        ax.legend(fontsize=8)
    fig.suptitle(
        "Fig. 3 reproduction: gray teacher, orange initial student, blue/red distilled student (seed 0)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_fig14(fig14: dict[str, Any], fig3: dict[str, Any] | None, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in (("token", "tab:blue"), ("sequence", "tab:red")):
        runs = fig14[name]
        ax.plot(runs[0]["eval_steps"], mean_curve(runs), color=color, label=f"{name}-level, analytic teacher")
    key = str(int(fig14["angle"]))
    if fig3 is not None and key in fig3["angles"]:
        runs = fig3["angles"][key]["sequence"]
        ax.plot(
            runs[0]["eval_steps"],
            mean_curve(runs),
            color="tab:red",
            ls="--",
            label="sequence-level, learned teacher",
        )
    ax.set_xlabel("OPD step")
    ax.set_ylabel("success (seed mean)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"Fig. 14 reproduction ({fig14['angle']:.0f} deg mismatch)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_fig8(t2: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"OPD": ("tab:blue", "-"), "POPD": ("tab:green", "-")}
    others = iter(["tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:gray"])
    for name, runs in t2["methods"].items():
        color, ls = styles[name] if name in styles else (next(others), ":")
        curve = mean_curve(runs)
        axes[0].plot(runs[0]["eval_steps"], curve, color=color, ls=ls, label=name)
        axes[1].plot(mean_curve(runs, "env_steps"), curve, color=color, ls=ls, label=name)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("environment steps generated for training (rollout cost)")
    for ax in axes:
        ax.set_ylabel("success@avg256 (seed mean)")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 8 / Table 2 reproduction: autoregressive navigation task")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_ar_paths(t2: dict[str, Any], path: Path) -> None:
    plt = _plt()
    names = list(t2["methods"])
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.2 * (len(names) + 1), 3.6), squeeze=False)
    panels = [("initial student", t2["student_init_paths"])] + [
        (n, t2["methods"][n][0]["paths"]) for n in names
    ]
    cx, cy, r = AR_OBSTACLE
    for ax, (title, paths) in zip(axes[0], panels):
        _draw_paths(ax, t2["teacher_paths"], "0.6", alpha=0.5)
        _draw_paths(ax, paths, "tab:blue")
        ax.add_patch(plt.Circle((cx, cy), r, color="k", alpha=0.3))
        ax.plot([10.0], [0.0], "k*", ms=10)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(-3, 13)
        ax.set_ylim(-6, 10)
        ax.set_aspect("equal")
    fig.suptitle("Autoregressive task: gray teacher, blue student after distillation (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    """Write ``results.md`` and the PNGs under ``out_dir``; returns the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Control-task reproduction: generated results", ""]
    meta = results.get("meta", {})
    if meta:
        lines += ["| part | mode | wall-clock (s, one thread) |", "|---|---|---|"]
        lines += [f"| {p} | {_mode(p, m)} | {m['wall_clock_s']} |" for p, m in meta.items()] + [""]
    fig3 = results.get("fig3")
    if fig3 is not None:
        plot_fig3(fig3, out_dir / "fig3_token_vs_sequence.png")
        lines += [
            "## Fig. 3: token- vs sequence-level OPD under teacher-student mismatch",
            "",
            f"Teacher success on its own task: {_pct(fig3['teacher_success'])}.",
            "",
            fig3_table(fig3),
            "",
            "![Fig. 3](fig3_token_vs_sequence.png)",
            "",
        ]
    fig14 = results.get("fig14")
    if fig14 is not None:
        plot_fig14(fig14, fig3, out_dir / "fig14_optimal_teacher.png")
        lines += [
            "## Fig. 14: sequence-level OPD under an analytic optimal teacher",
            "",
            fig14_table(fig14, fig3),
            "",
            "![Fig. 14](fig14_optimal_teacher.png)",
            "",
        ]
    t2 = results.get("table2")
    if t2 is not None:
        plot_fig8(t2, out_dir / "fig8_popd_vs_opd.png")
        plot_ar_paths(t2, out_dir / "ar_trajectories.png")
        lines += [
            "## Table 2 and Fig. 8: autoregressive navigation task",
            "",
            f"Teacher success {_pct(t2['teacher_success'])}; initial student: {_pct(t2['student_init_success_own_target'])} "
            f"on its own target, {_pct(t2['student_init_success_teacher_target'])} on the teacher's.",
            "",
            table2(t2),
            "",
        ]
        strict = table2_rules(t2)
        if strict:
            lines += ["Under both success rules (`success_rule`, `control/envs.py`):", "", strict, ""]
        lines += [
            "![Fig. 8](fig8_popd_vs_opd.png)",
            "",
            "![trajectories](ar_trajectories.png)",
            "",
        ]
    md = out_dir / "results.md"
    md.write_text("\n".join(lines))
    return md
