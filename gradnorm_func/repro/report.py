"""Figures, Markdown table, verdict sentences and JSON summary of the toy reproduction (Chen et
al. 2018, Fig. 2), and the helpers the digits report shares with it.

Figures are drawn on a ``matplotlib.figure.Figure`` (no pyplot, no global backend switch) and
saved as PNG at 80 dpi.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from gradnorm_func.repro.experiment import METHODS, Method
from gradnorm_func.repro.training import RunRecord, normalised_test_loss
from gradnorm_func.repro.verdicts import (
    final_losses,
    log_weight_variation,
    peak_weight,
    spearman,
)

CLAIMS = {
    1: "T=2: equal weights let the large-scale task suppress the small one; "
       "GradNorm raises w_0 and improves the test loss",
    2: "T=10: GradNorm improves significantly over equal weights",
    3: "T=10: w_i grows larger for smaller sigma_i",
    4: "T=10: GradNorm is more stable than, and outperforms, uncertainty weighting",
}
COLORS = {"equal": "tab:gray", "gradnorm": "tab:blue", "uncertainty": "tab:orange"}
NAMES = {"equal": "equal weights", "gradnorm": "GradNorm", "uncertainty": "uncertainty weighting"}
DPI = 80


def mean_std(values: Sequence[float]) -> str:
    """'mean ± std' (sample std over seeds; 0 for one seed)."""
    v = torch.tensor(values, dtype=torch.float64)
    std = float(v.std()) if len(values) > 1 else 0.0
    return f"{float(v.mean()):.3g} ± {std:.2g}"


def span(values: Sequence[float]) -> str:
    """'min-max' over seeds to 3 significant digits, or the one value when they agree."""
    low, high = f"{min(values):.3g}", f"{max(values):.3g}"
    return low if low == high else f"{low} to {high}"


def seeds_phrase(count: int, total: int) -> str:
    return f"{count}/{total} seeds"


def p_phrase(gain: dict[str, Any]) -> str:
    """'k/n seeds, sign test p = 0.031' for an :func:`~gradnorm_func.repro.verdicts.improvement`."""
    return f"{seeds_phrase(gain['wins'], gain['seeds'])}, sign test p = {gain['sign_test_p']:.3f}"


def loss_comparison(gain: dict[str, Any], better: str, worse: str) -> str:
    """A sentence fragment comparing final normalised test losses N (lower is better)."""
    rel = gain["relative_improvement"]
    direction = "lower" if rel >= 0 else "higher"
    return (f"N = sum_i L_i/L_i(0) is {gain['mean_better']:.3g} for {better} against "
            f"{gain['mean_worse']:.3g} for {worse}, {abs(rel):.1%} {direction} "
            f"(lower in {p_phrase(gain)})")


def summarise(runs: dict[Method, list[RunRecord]], sigmas: Tensor) -> dict[str, Any]:
    """Per-method, per-seed final metrics of one problem, for the JSON summary. Spearman is
    null where it is undefined (constant weights, as under equal weights)."""
    out: dict[str, Any] = {"sigmas": sigmas.tolist(), "methods": {}}
    for method in METHODS:
        records = runs[method]
        out["methods"][method] = {
            "final_normalised_test_loss": final_losses(records),
            "final_weights": [r.weights[-1].tolist() for r in records],
            "peak_weight": [peak_weight(r) for r in records],
            "log_weight_variation": [log_weight_variation(r) for r in records],
            "spearman_final_weights_vs_sigma": [spearman(r.weights[-1], sigmas) for r in records],
            "seconds_per_step": [r.seconds_per_step for r in records],
        }
    return out


def correlation_cell(values: list[float | None]) -> str:
    """mean ± std of the defined values; '—' when none is defined."""
    defined = [v for v in values if v is not None]
    if not defined:
        return "—"
    partial = "" if len(defined) == len(values) else f" ({seeds_phrase(len(defined), len(values))})"
    return mean_std(defined) + partial


def markdown_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Final metrics, mean ± std over seeds, one row per problem and method."""
    lines = ["| problem | method | final sum_i L_i/L_i(0) | final w (min / max over tasks) "
             "| peak weight | log-weight variation | Spearman(w, sigma) | ms / step |",
             "|---|---|---|---|---|---|---|---|"]
    for name, summary in summaries.items():
        for method, m in summary["methods"].items():
            final_w = m["final_weights"]
            w_range = (f"{mean_std([min(w) for w in final_w])} / "
                       f"{mean_std([max(w) for w in final_w])}")
            ms = mean_std([1e3 * s for s in m["seconds_per_step"]])
            lines.append(f"| {name} | {method} | {mean_std(m['final_normalised_test_loss'])} "
                         f"| {w_range} | {mean_std(m['peak_weight'])} "
                         f"| {mean_std(m['log_weight_variation'])} "
                         f"| {correlation_cell(m['spearman_final_weights_vs_sigma'])} | {ms} |")
    return "\n".join(lines) + "\n"


def verdict_lines(verdicts: list[dict[str, Any]]) -> list[str]:
    """One Markdown sentence per claim: the verdict in bold, then the numbers behind it."""
    lines = []
    for v in verdicts:
        claim = v["claim"]
        word = "reproduced" if v["holds"] else "not reproduced"
        head = f"Claim {claim} ({CLAIMS[claim]}): **{word}**."
        if claim == 1:
            ratios = v["equal_final_loss_ratios"]
            suppressed = sum(q[0] > q[1] for q in ratios)
            body = (f"Under equal weights the small task's test loss ends at "
                    f"{span([q[0] for q in ratios])} x its initial value and the large task's at "
                    f"{span([q[1] for q in ratios])} x (small task behind in "
                    f"{seeds_phrase(suppressed, len(ratios))}); GradNorm's final w_0 is "
                    f"{span(v['gradnorm_final_w0'])}; "
                    + loss_comparison(v["gradnorm_vs_equal"], "GradNorm", "equal weights") + ".")
        elif claim == 2:
            body = loss_comparison(v["gradnorm_vs_equal"], "GradNorm", "equal weights") + "."
        elif claim == 3:
            rhos = ", ".join("undefined" if r is None else f"{r:.3g}"
                             for r in v["spearman_per_seed"])
            mean = "undefined" if v["spearman_mean"] is None else f"{v['spearman_mean']:.3g}"
            body = (f"Spearman(final w, sigma) per seed: {rhos} (mean {mean}; the criterion is "
                    f"< 0 in every seed and a mean <= -0.8).")
        else:
            peaks = v["peak_weight"]
            larger = sum(u > g for g, u in zip(peaks["gradnorm"], peaks["uncertainty"]))
            body = (loss_comparison(v["gradnorm_vs_uncertainty"], "GradNorm",
                                    "uncertainty weighting")
                    + f"; uncertainty weighting's peak weight is {span(peaks['uncertainty'])} "
                      f"against GradNorm's {span(peaks['gradnorm'])} (larger in "
                      f"{seeds_phrase(larger, len(peaks['gradnorm']))}).")
        lines.append(f"{head} {body}")
    return lines


def band(ax: Axes, steps: Tensor, curves: Tensor, color: Any, label: str) -> None:
    """Mean over seeds (line) and min-max over seeds (band); ``curves`` is [seeds, time]."""
    ax.plot(steps, curves.mean(0), color=color, label=label, lw=1.2)
    if curves.shape[0] > 1:
        ax.fill_between(steps, curves.min(0).values, curves.max(0).values, color=color,
                        alpha=0.2, lw=0)


def figure(runs: dict[Method, list[RunRecord]], sigmas: Tensor, title: str, path: Path) -> None:
    """Figure 2 in spirit: GradNorm's w_i(t), uncertainty weighting's w_i(t) = exp(-s_i(t)),
    and the normalised test loss per method, each with its min-max band over seeds."""
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    cmap = matplotlib.colormaps["viridis"]
    order = sigmas.argsort().tolist()
    weighted: tuple[Method, Method] = ("gradnorm", "uncertainty")
    for ax, method in zip(axes[:2], weighted):
        weights = torch.stack([r.weights for r in runs[method]])  # [seeds, steps, T]
        steps = torch.arange(weights.shape[1])
        for rank, i in enumerate(order):
            color = cmap(rank / max(1, len(order) - 1))
            band(ax, steps, weights[:, :, i], color, f"σ={float(sigmas[i]):.3g}")
        ax.set_title(f"{method}: w_i(t) (dark = small σ_i)")
        ax.set_xlabel("step")
        if method == "uncertainty":
            ax.set_yscale("log")
        if len(order) <= 4:
            ax.legend(fontsize=7)
    for method in METHODS:
        records = runs[method]
        curves = torch.stack([normalised_test_loss(r) for r in records])
        band(axes[2], records[0].eval_steps, curves, COLORS[method], method)
    axes[2].set_title("test Σ_i L_i(t)/L_i(0)")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def write_outputs(out: Path, *, settings: dict[str, Any], summaries: dict[str, dict[str, Any]],
                  verdicts: list[dict[str, Any]], notes: list[str]) -> None:
    """Writes ``summary.json`` and ``table.md`` (table, notes and verdicts) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {"settings": settings, "problems": summaries, "verdicts": verdicts, "notes": notes}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = "\n\n".join([markdown_table(summaries).rstrip("\n"), *notes, *verdict_lines(verdicts)])
    (out / "table.md").write_text(text + "\n")
