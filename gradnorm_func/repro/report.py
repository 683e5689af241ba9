"""Figures, Markdown table and JSON summary of the toy reproduction (Chen et al. 2018, Fig. 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from gradnorm_func.repro.experiment import METHODS, Method, RunRecord  # noqa: E402
from gradnorm_func.repro.verdicts import (  # noqa: E402
    final_losses,
    log_weight_variation,
    normalised_test_loss,
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


def mean_std(values: list[float]) -> str:
    """'mean ± std' (sample std over seeds; 0 for one seed)."""
    v = torch.tensor(values, dtype=torch.float64)
    std = float(v.std()) if len(values) > 1 else 0.0
    return f"{float(v.mean()):.3g} ± {std:.2g}"


def summarise(runs: dict[Method, list[RunRecord]], sigmas: Tensor) -> dict[str, Any]:
    """Per-method, per-seed final metrics of one problem, for the JSON summary."""
    out: dict[str, Any] = {"sigmas": sigmas.tolist(), "methods": {}}
    for method in METHODS:
        records = runs[method]
        out["methods"][method] = {
            "final_normalised_test_loss": final_losses(records),
            "final_weights": [r.weights[-1].tolist() for r in records],
            "peak_weight": [peak_weight(r) for r in records],
            "log_weight_variation": [log_weight_variation(r) for r in records],
            "spearman_final_weights_vs_sigma": [spearman(r.weights[-1], sigmas) for r in records],
        }
    return out


def markdown_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Final metrics, mean ± std over seeds, one row per problem and method."""
    lines = ["| problem | method | final sum_i L_i/L_i(0) | final w (min / max over tasks) "
             "| peak weight | log-weight variation | Spearman(w, sigma) |",
             "|---|---|---|---|---|---|---|"]
    for name, summary in summaries.items():
        for method, m in summary["methods"].items():
            final_w = m["final_weights"]
            w_range = (f"{mean_std([min(w) for w in final_w])} / "
                       f"{mean_std([max(w) for w in final_w])}")
            rho = "—" if method == "equal" else mean_std(m["spearman_final_weights_vs_sigma"])
            lines.append(f"| {name} | {method} | {mean_std(m['final_normalised_test_loss'])} "
                         f"| {w_range} | {mean_std(m['peak_weight'])} "
                         f"| {mean_std(m['log_weight_variation'])} | {rho} |")
    return "\n".join(lines) + "\n"


def verdict_lines(verdicts: list[dict[str, Any]]) -> list[str]:
    """One line per claim: the verdict, then the numbers behind it."""
    lines = []
    for v in verdicts:
        word = "reproduced" if v["holds"] else "not reproduced"
        numbers = {k: v[k] for k in v if k not in ("claim", "holds")}
        lines.append(f"Claim {v['claim']} ({CLAIMS[v['claim']]}): **{word}**  \n"
                     f"`{json.dumps(numbers)}`")
    return lines


def _band(ax: Any, steps: Tensor, curves: Tensor, color: Any, label: str) -> None:
    """Mean over seeds (line) and min-max over seeds (band); ``curves`` is [seeds, time]."""
    ax.plot(steps, curves.mean(0), color=color, label=label, lw=1.2)
    if curves.shape[0] > 1:
        ax.fill_between(steps, curves.min(0).values, curves.max(0).values, color=color,
                        alpha=0.2, lw=0)


def figure(runs: dict[Method, list[RunRecord]], sigmas: Tensor, title: str, path: Path) -> None:
    """Figure 2 in spirit: GradNorm's w_i(t), uncertainty weighting's w_i(t) = exp(-s_i(t)),
    and the normalised test loss per method, each with its min-max band over seeds."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    cmap = plt.get_cmap("viridis")
    order = sigmas.argsort().tolist()
    weighted: tuple[Method, Method] = ("gradnorm", "uncertainty")
    for ax, method in zip(axes[:2], weighted):
        weights = torch.stack([r.weights for r in runs[method]])  # [seeds, steps, T]
        steps = torch.arange(weights.shape[1])
        for rank, i in enumerate(order):
            color = cmap(rank / max(1, len(order) - 1))
            _band(ax, steps, weights[:, :, i], color, f"σ={float(sigmas[i]):.3g}")
        ax.set_title(f"{method}: w_i(t) (dark = small σ_i)")
        ax.set_xlabel("step")
        if method == "uncertainty":
            ax.set_yscale("log")
        if len(order) <= 4:
            ax.legend(fontsize=7)
    for method in METHODS:
        records = runs[method]
        curves = torch.stack([normalised_test_loss(r) for r in records])
        _band(axes[2], records[0].eval_steps, curves, COLORS[method], method)
    axes[2].set_title("test Σ_i L_i(t)/L_i(0)")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_outputs(out: Path, *, settings: dict[str, Any], summaries: dict[str, dict[str, Any]],
                  verdicts: list[dict[str, Any]]) -> None:
    """Writes ``summary.json``, ``table.md`` (table and verdicts) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {"settings": settings, "problems": summaries, "verdicts": verdicts}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = markdown_table(summaries) + "\n" + "\n\n".join(verdict_lines(verdicts)) + "\n"
    (out / "table.md").write_text(text)
