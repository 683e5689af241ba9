"""The paper's four claims about its toy experiment (Chen et al. 2018, Section 4), each turned
into a precise, checkable criterion over seeds.

Per run, with L_i(t) the test loss of task i and L_i(0) its value at the (shared) initialisation:

- final normalised test loss: N = sum_i L_i(t_end) / L_i(0), the paper's Figure 2 metric;
- peak weight: max_{t,i} w_i(t), the raw weight (exp(-s_i) for uncertainty weighting);
- log-weight variation: sum_t sum_i |log w_i(t+1) - log w_i(t)|, the total variation of the
  log-weight trajectory (scale-free; large when weights grow or oscillate).

"A improves on B" means: the mean over seeds of N_B - N_A is positive *and* a one-sided exact
sign test over the paired seeds (A and B share data and initialisation) gives
p = P(Binomial(n, 1/2) >= wins) <= 0.05. With n seeds the smallest possible p is 2^-n, so
this needs at least 5 seeds.

1. T=2, sigma=(1, 100): (a) under equal weights the small task is suppressed: in every seed its
   final loss ratio L_0/L_0(0) exceeds the large task's L_1/L_1(0); (b) GradNorm raises w_0:
   final w_0 > 1 in every seed; (c) GradNorm improves on equal weights.
2. T=10: GradNorm improves on equal weights (sign test, as above).
3. T=10: w_i grows larger for smaller sigma_i: the Spearman correlation between GradNorm's
   final weights and sigma is negative in every seed and at most -0.8 on average.
4. T=10: GradNorm improves on uncertainty weighting, and is more stable: uncertainty
   weighting's peak weight exceeds GradNorm's in every seed ("weights grow too large").

The sign test (:func:`improvement`) and the multi-task score :func:`delta_m` also serve the
digits experiment (:mod:`gradnorm_func.repro.digits_report`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from torch import Tensor

from gradnorm_func.repro.experiment import Method
from gradnorm_func.repro.training import RunRecord, normalised_test_loss

SIGN_TEST_LEVEL = 0.05
SPEARMAN_BOUND = -0.8


def peak_weight(record: RunRecord) -> float:
    """max_{t,i} w_i(t)."""
    return float(record.weights.max())


def log_weight_variation(record: RunRecord) -> float:
    """sum_t sum_i |log w_i(t+1) - log w_i(t)|."""
    return float(record.weights.log().diff(dim=0).abs().sum())


def spearman(a: Tensor, b: Tensor) -> float | None:
    """Spearman's rank correlation: the Pearson correlation of the ranks (no ties assumed).

    None when either vector is constant (e.g. equal weights), where it is undefined.
    """
    if bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return None
    ranks = [v.argsort().argsort().double() for v in (a, b)]
    ra, rb = (r - r.mean() for r in ranks)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def sign_test_p(wins: int, n: int) -> float:
    """One-sided exact sign test: P(Binomial(n, 1/2) >= wins)."""
    return float(sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n)


def improvement(better: Sequence[float], worse: Sequence[float]) -> dict[str, Any]:
    """Paired comparison over seeds of a quantity where lower is better (e.g. final
    normalised test losses): does ``better`` beat ``worse``?

    ``mean_difference`` is the mean of worse - better (``relative_improvement`` divides it by
    the mean of ``worse``; None when that is 0); ``wins`` counts the seeds where it is
    positive; ``holds`` needs a positive mean and sign test p <= 0.05.
    """
    diffs = [w - b for b, w in zip(better, worse)]
    wins = sum(d > 0 for d in diffs)
    p = sign_test_p(wins, len(diffs))
    mean_diff = sum(diffs) / len(diffs)
    mean_better, mean_worse = sum(better) / len(better), sum(worse) / len(worse)
    return {"mean_better": mean_better, "mean_worse": mean_worse, "mean_difference": mean_diff,
            "relative_improvement": mean_diff / mean_worse if mean_worse else None,
            "wins": wins, "seeds": len(diffs), "sign_test_p": p,
            "holds": bool(mean_diff > 0 and p <= SIGN_TEST_LEVEL)}


def delta_m(metrics: Sequence[float], baseline: Sequence[float],
            lower_is_better: Sequence[bool]) -> float:
    """The multi-task score of Maninis et al. (CVPR 2019) and Vandenhende et al. (TPAMI 2021),

        Delta_m = (1/T) sum_i (-1)^{l_i} (M_i - M_b,i) / M_b,i,

    with l_i = 1 when lower is better for metric i: the mean relative change against the
    baseline b, positive when the method is better. Ill-conditioned when some |M_b,i| is small.
    """
    if not len(metrics) == len(baseline) == len(lower_is_better):
        raise ValueError("metrics, baseline and lower_is_better must have one entry per task")
    terms = [(-1 if low else 1) * (m - b) / b
             for m, b, low in zip(metrics, baseline, lower_is_better)]
    return sum(terms) / len(terms)


def final_losses(records: list[RunRecord]) -> list[float]:
    return [float(normalised_test_loss(r)[-1]) for r in records]


def claim_1(runs: dict[Method, list[RunRecord]]) -> dict[str, Any]:
    """T=2: equal weights suppress task 0; GradNorm raises w_0 and improves the test loss."""
    ratios = [r.test_losses[-1] / r.test_losses[0] for r in runs["equal"]]
    w0 = [float(r.weights[-1, 0]) for r in runs["gradnorm"]]
    gain = improvement(final_losses(runs["gradnorm"]), final_losses(runs["equal"]))
    suppressed = all(float(q[0]) > float(q[1]) for q in ratios)
    return {"claim": 1, "holds": suppressed and min(w0) > 1 and gain["holds"],
            "equal_final_loss_ratios": [q.tolist() for q in ratios],
            "small_task_suppressed": suppressed, "gradnorm_final_w0": w0,
            "gradnorm_vs_equal": gain}


def claim_2(runs: dict[Method, list[RunRecord]]) -> dict[str, Any]:
    """T=10: GradNorm improves significantly on equal weights."""
    gain = improvement(final_losses(runs["gradnorm"]), final_losses(runs["equal"]))
    return {"claim": 2, "holds": gain["holds"], "gradnorm_vs_equal": gain}


def claim_3(runs: dict[Method, list[RunRecord]], sigmas: Tensor) -> dict[str, Any]:
    """T=10: GradNorm's final weights are anti-correlated with sigma."""
    rhos = [spearman(r.weights[-1], sigmas) for r in runs["gradnorm"]]
    defined = [r for r in rhos if r is not None]
    mean = sum(defined) / len(defined) if len(defined) == len(rhos) else None
    return {"claim": 3, "holds": mean is not None and max(defined) < 0 and mean <= SPEARMAN_BOUND,
            "spearman_per_seed": rhos, "spearman_mean": mean}


def claim_4(runs: dict[Method, list[RunRecord]]) -> dict[str, Any]:
    """T=10: GradNorm beats uncertainty weighting, whose weights grow larger."""
    gain = improvement(final_losses(runs["gradnorm"]), final_losses(runs["uncertainty"]))
    peaks = {m: [peak_weight(r) for r in runs[m]] for m in ("gradnorm", "uncertainty")}
    variation = {m: [log_weight_variation(r) for r in runs[m]] for m in ("gradnorm", "uncertainty")}
    larger = all(u > g for g, u in zip(peaks["gradnorm"], peaks["uncertainty"]))
    return {"claim": 4, "holds": gain["holds"] and larger, "gradnorm_vs_uncertainty": gain,
            "peak_weight": peaks, "uncertainty_peak_larger_every_seed": larger,
            "log_weight_variation": variation}


def all_claims(two: dict[Method, list[RunRecord]], ten: dict[Method, list[RunRecord]],
               ten_sigmas: Tensor) -> list[dict[str, Any]]:
    """The verdicts of the four claims; each dict has ``claim``, ``holds`` and its numbers."""
    return [claim_1(two), claim_2(ten), claim_3(ten, ten_sigmas), claim_4(ten)]
