"""Summary, verdicts, table and figure of the digits experiment
(:mod:`gradnorm_func.repro.digits`).

Every method is scored by Delta_m against equal weights
(:func:`~gradnorm_func.repro.verdicts.delta_m`) on the final test metrics of the same seed:
accuracy for the three classification tasks and R^2 for ink, all higher-is-better.
"A improves Delta_m over B" means the mean over seeds of Delta_m(A) - Delta_m(B) is positive
and the one-sided sign test over the paired seeds gives p <= 0.05
(:func:`~gradnorm_func.repro.verdicts.improvement`), as in the toy's verdicts.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib
import torch
from matplotlib.figure import Figure

from gradnorm_func.repro.digits import METHODS, METRIC_NAMES, NAMES, TASKS
from gradnorm_func.repro.report import DPI, band, mean_std, p_phrase
from gradnorm_func.repro.training import RunRecord, normalised_test_loss
from gradnorm_func.repro.verdicts import delta_m, improvement

LOWER_IS_BETTER = (False,) * len(TASKS)
GRADNORMS = ("gradnorm", "gradnorm_logc")
BASELINES = ("equal", "uncertainty", "dwa")
WEIGHTED = ("gradnorm", "gradnorm_logc", "uncertainty", "dwa")  # the figure's weight panels
ILL_CONDITIONED = 0.1  # |M_b,i| below this makes task i's relative change ill-conditioned
MAX_POINTS = 250  # weight curves are drawn at every k-th step, at most this many points
COLORS = {"equal": "black", "gradnorm": "tab:blue", "gradnorm_logc": "tab:cyan",
          "uncertainty": "tab:orange", "dwa": "tab:green", "gradnorm_a0": "tab:purple",
          "gradnorm_a0.5": "tab:pink"}


def summarise(runs: dict[str, list[RunRecord]]) -> dict[str, Any]:
    """Per-method, per-seed final test metrics, Delta_m against equal weights (same seed),
    final weights and wall time per step; mean-over-seeds curves of weights and metrics."""
    base = [r.test_metrics[-1].tolist() for r in runs["equal"]]
    methods: dict[str, Any] = {}
    for method in METHODS:
        records = runs[method]
        finals = [r.test_metrics[-1].tolist() for r in records]
        steps = records[0].eval_steps
        methods[method] = {
            "name": NAMES[method],
            "final_test_metrics": finals,
            "delta_m": [delta_m(m, b, LOWER_IS_BETTER) for m, b in zip(finals, base)],
            "final_normalised_test_loss": [float(normalised_test_loss(r)[-1]) for r in records],
            "final_weights": [r.weights[-1].tolist() for r in records],
            "seconds_per_step": [r.seconds_per_step for r in records],
            "eval_steps": steps.tolist(),
            "mean_test_metrics": torch.stack([r.test_metrics for r in records]).mean(0).tolist(),
            "mean_weights_at_eval_steps": torch.stack(
                [r.weights[steps[:-1]] for r in records]).mean(0).tolist(),
        }
    return {"tasks": list(TASKS), "metrics": list(METRIC_NAMES), "methods": methods}


def compare(summary: dict[str, Any], method: str, baseline: str) -> dict[str, Any]:
    """Does ``method`` improve Delta_m over ``baseline``? Paired over seeds, sign test."""
    ms = summary["methods"]
    ours, theirs = ms[method]["delta_m"], ms[baseline]["delta_m"]
    gain = improvement([-d for d in ours], [-d for d in theirs])  # improvement: lower is better
    mean_metrics = {m: torch.tensor(ms[m]["final_test_metrics"]).mean(0).tolist()
                    for m in (method, baseline)}
    return {"method": method, "baseline": baseline, "holds": gain["holds"],
            "mean_delta_m": {method: sum(ours) / len(ours), baseline: sum(theirs) / len(theirs)},
            "mean_difference": gain["mean_difference"], "wins": gain["wins"],
            "seeds": gain["seeds"], "sign_test_p": gain["sign_test_p"],
            "mean_final_test_metrics": mean_metrics}


def verdicts(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """GradNorm (defaults, log C) against equal weights, uncertainty weighting and DWA; the
    alpha sensitivity (alpha 0, 0.5; 1.5 is the default) and the baselines against equal."""
    pairs = [(g, b) for g in GRADNORMS for b in BASELINES]
    pairs += [(m, "equal") for m in ("gradnorm_a0", "gradnorm_a0.5", "uncertainty", "dwa")]
    return [compare(summary, m, b) for m, b in pairs]


def verdict_sentence(v: dict[str, Any]) -> str:
    """E.g. 'GradNorm (defaults) improves Delta_m over equal weights: +50.7% (better in 5/5
    seeds, sign test p = 0.031): digit 1 accuracy 0.541 -> 0.9, ..., ink R^2 0.999 -> 0.769
    (ink pays).' A task pays where its mean metric falls by more than the printed precision."""
    method, baseline = v["method"], v["baseline"]
    diff, ours = v["mean_difference"], v["mean_delta_m"][method]
    stats = f"better in {p_phrase(v)}"
    if baseline == "equal":
        amount = f"{ours:+.1%}"
    else:
        amount = (f"{ours:+.1%} against {v['mean_delta_m'][baseline]:+.1%}, "
                  f"{100 * diff:+.1f} points")
    if v["holds"]:
        verb = f"improves Delta_m over {NAMES[baseline]}"
    elif diff > 0:
        verb = f"does not significantly improve Delta_m over {NAMES[baseline]}"
    else:
        verb = f"does not improve Delta_m over {NAMES[baseline]}"
    theirs_m, ours_m = (v["mean_final_test_metrics"][m] for m in (baseline, method))
    changes = ", ".join(f"{task} {metric} {b:.3g} -> {o:.3g}" for task, metric, b, o
                        in zip(TASKS, METRIC_NAMES, theirs_m, ours_m))
    payers = [task for task, b, o in zip(TASKS, theirs_m, ours_m)
              if o < b and f"{o:.3g}" != f"{b:.3g}"]  # a loss visible at the printed precision
    paying = ""
    if payers:
        names = payers[0] if len(payers) == 1 else f"{', '.join(payers[:-1])} and {payers[-1]}"
        paying = f" ({names} {'pays' if len(payers) == 1 else 'pay'})"
    sentence = f"{NAMES[method]} {verb}: {amount} ({stats}): {changes}{paying}."
    return sentence[0].upper() + sentence[1:]


def timing_sentence(summary: dict[str, Any]) -> str:
    """Median wall time per training step of each method, and its ratio to equal weights'."""
    medians = {m: statistics.median(s["seconds_per_step"]) for m, s in summary["methods"].items()}
    parts = [f"{NAMES[m]} {1e3 * t:.2g} ms ({t / medians['equal']:.1f}x)"
             for m, t in medians.items()]
    return "Wall time per training step (median over seeds): " + ", ".join(parts) + "."


def conditioning_notes(summary: dict[str, Any]) -> list[str]:
    """A note for each task whose equal-weights metric is near 0 in some seed, where its
    relative change, and so Delta_m, is ill-conditioned."""
    notes = []
    base = torch.tensor(summary["methods"]["equal"]["final_test_metrics"])  # [seeds, T]
    for i, (task, metric) in enumerate(zip(TASKS, METRIC_NAMES)):
        low = base[:, i].abs().min()
        if low < ILL_CONDITIONED:
            notes.append(f"Equal weights' {task} {metric} is {float(low):.3g} in some seed: its "
                         f"relative change, and Delta_m with it, is ill-conditioned.")
    return notes


def markdown_table(summary: dict[str, Any]) -> str:
    """Final test metrics, Delta_m, final weights and ms per step; mean ± std over seeds."""
    heads = [f"{t} {m}" for t, m in zip(TASKS, METRIC_NAMES)]
    lines = ["| method | " + " | ".join(heads) + " | Delta_m vs equal | final w ("
             + " / ".join(TASKS) + ") | ms / step |",
             "|---" * (len(TASKS) + 4) + "|"]
    for method, s in summary["methods"].items():
        finals = torch.tensor(s["final_test_metrics"])
        weights = torch.tensor(s["final_weights"]).mean(0)
        cells = [mean_std(finals[:, i].tolist()) for i in range(len(TASKS))]
        lines.append(f"| {s['name']} | " + " | ".join(cells)
                     + f" | {mean_std([100 * d for d in s['delta_m']])} %"
                     + " | " + " / ".join(f"{float(w):.3g}" for w in weights)
                     + f" | {mean_std([1e3 * t for t in s['seconds_per_step']])} |")
    return "\n".join(lines) + "\n"


def figure(runs: dict[str, list[RunRecord]], title: str, path: Path) -> None:
    """Top: w_i(t) of each weighting method (log scale, at every k-th step); bottom: each
    task's test metric over time per method, equal weights on top. Lines are means over seeds,
    bands the min-max over seeds."""
    fig = Figure(figsize=(14, 6))
    axes = fig.subplots(2, len(TASKS))
    cmap = matplotlib.colormaps["tab10"]
    for ax, method in zip(axes[0], WEIGHTED):
        weights = torch.stack([r.weights for r in runs[method]])  # [seeds, steps, T]
        stride = -(-weights.shape[1] // MAX_POINTS)
        steps = torch.arange(0, weights.shape[1], stride)
        weights = weights[:, ::stride]
        for i, task in enumerate(TASKS):
            band(ax, steps, weights[:, :, i], cmap(i), task)
        ax.set_yscale("log")
        ax.set_title(f"{NAMES[method]}: w_i(t)", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for i, ax in enumerate(axes[1]):
        for method in reversed(METHODS):
            curves = torch.stack([r.test_metrics[:, i] for r in runs[method]])
            band(ax, runs[method][0].eval_steps, curves, COLORS[method], NAMES[method])
        ax.set_title(f"test {TASKS[i]} {METRIC_NAMES[i]}", fontsize=9)
        ax.set_xlabel("step")
        if METRIC_NAMES[i] == "R^2":
            ax.set_ylim(-0.5, 1.02)
    handles, labels = axes[1][0].get_legend_handles_labels()
    axes[1][0].legend(handles[::-1], labels[::-1], fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def write_outputs(out: Path, *, settings: dict[str, Any], summary: dict[str, Any],
                  verdict_list: list[dict[str, Any]], notes: list[str]) -> None:
    """Writes ``summary.json`` and ``table.md`` (table, notes, verdicts, timing) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    full = {"settings": settings, "summary": summary, "verdicts": verdict_list, "notes": notes}
    (out / "summary.json").write_text(json.dumps(full, indent=1) + "\n")
    text = "\n\n".join([markdown_table(summary).rstrip("\n"), *notes,
                        *(verdict_sentence(v) for v in verdict_list), timing_sentence(summary)])
    (out / "table.md").write_text(text + "\n")
