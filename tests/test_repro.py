"""The toy reproduction (``python -m gradnorm_func.repro``): smoke test, qualitative weight
claims on a small real run, and the uncertainty baseline against its closed-form optimum."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gradnorm_func.repro.__main__ import main
from gradnorm_func.repro.experiment import METHODS, train_toy
from gradnorm_func.repro.toy import make_data
from gradnorm_func.repro.training import TrainConfig, batch_order
from gradnorm_func.repro.uncertainty import uncertainty_loss, uncertainty_weights
from gradnorm_func.repro.verdicts import improvement, sign_test_p, spearman


def test_command_writes_figures_table_and_json(tmp_path, capsys):
    result = main(["--out", str(tmp_path), "--seeds", "2", "--steps", "6", "--eval-every", "3",
                   "--n-train", "64", "--n-test", "32", "--batch-size", "16", "--tasks", "3",
                   "--threads", "1"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(result) == {"toy"}
    assert (tmp_path / "figures" / "toy_T2.png").stat().st_size > 1000
    assert (tmp_path / "figures" / "toy_T3.png").stat().st_size > 1000
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| T=") == 2 * len(METHODS)
    assert summary["settings"]["seeds"] == [0, 1]
    assert summary["settings"]["steps"] == 6
    assert set(summary["problems"]) == {"T=2", "T=3"}
    assert summary["problems"]["T=2"]["sigmas"] == [1.0, 100.0]
    for problem in summary["problems"].values():
        assert set(problem["methods"]) == set(METHODS)
        for metrics in problem["methods"].values():
            assert len(metrics["final_normalised_test_loss"]) == 2
            assert all(len(w) == len(problem["sigmas"]) for w in metrics["final_weights"])
            assert all(s > 0 for s in metrics["seconds_per_step"])
        # Equal weights are constant: their rank correlation is undefined, recorded as null.
        assert problem["methods"]["equal"]["spearman_final_weights_vs_sigma"] == [None, None]
    assert all(row.split("|")[7].strip() == "—" for row in table.splitlines()
               if row.startswith("| T=") and "| equal |" in row)
    assert [v["claim"] for v in summary["verdicts"]] == [1, 2, 3, 4]
    assert all(isinstance(v["holds"], bool) for v in summary["verdicts"])
    printed = capsys.readouterr().out
    assert printed.count("reproduced.") == 4
    assert "{" not in printed  # sentences, not JSON
    assert "sign test p = " in printed


def test_every_method_starts_from_the_same_model_and_batches():
    """Equal weights, GradNorm (which updates the network with w(0) = 1) and uncertainty
    weighting (exp(-0) L + 0 = L at s = 0) take the same first step: same initialisation,
    same first batch. From the second step on GradNorm's weights differ."""
    data = make_data(torch.tensor([1.0, 100.0]), seed=0, n_train=200, n_test=50)
    config = TrainConfig(steps=3, batch_size=20, eval_every=1)
    runs = {m: train_toy(m, data, seed=1, config=config) for m in METHODS}
    for method in ("gradnorm", "uncertainty"):
        torch.testing.assert_close(runs[method].test_losses[:2], runs["equal"].test_losses[:2])
    assert not torch.equal(runs["gradnorm"].test_losses[3], runs["equal"].test_losses[3])


def test_batch_order_is_one_permutation_per_epoch():
    order = batch_order(50, steps=7, batch_size=16, seed=0)  # 3 batches an epoch, 2 dropped
    assert order.shape == (7, 16)
    for epoch in (order[0:3], order[3:6]):
        assert len(set(epoch.flatten().tolist())) == 48
    assert not torch.equal(order[0:3], order[3:6])


def final_gradnorm_weights(sigmas: list[float], steps: int) -> torch.Tensor:
    data = make_data(torch.tensor(sigmas), seed=0, n_train=1000, n_test=100)
    record = train_toy("gradnorm", data, seed=0, config=TrainConfig(steps=steps, eval_every=steps))
    weights = record.weights[-1]
    torch.testing.assert_close(weights.sum(), torch.tensor(float(len(sigmas))))
    return weights


def test_gradnorm_raises_the_small_task_weight_for_two_tasks():
    weights = final_gradnorm_weights([1.0, 100.0], steps=100)
    assert weights[0] > weights[1]


def test_gradnorm_weights_are_anti_correlated_with_sigma():
    # Five tasks; -0.8 tolerates at most two adjacent rank swaps (one swap gives -0.9).
    sigmas = [30.0, 1.0, 100.0, 3.0, 10.0]
    weights = final_gradnorm_weights(sigmas, steps=150)
    rho = spearman(weights, torch.tensor(sigmas))
    assert rho is not None and rho <= -0.8


def test_uncertainty_weighting_converges_to_closed_form_optimum():
    """For fixed L_i, exp(-s) L + s is minimised at s* = log L (w* = 1 / L)."""
    losses = torch.tensor([0.05, 1.0, 7.0, 300.0])
    log_vars = torch.zeros(4, requires_grad=True)
    optimizer = torch.optim.Adam([log_vars], lr=0.05)
    for _ in range(3000):
        optimizer.zero_grad()
        uncertainty_loss(log_vars, losses).backward()
        optimizer.step()
    torch.testing.assert_close(log_vars.detach(), losses.log(), atol=1e-3, rtol=0)
    torch.testing.assert_close(uncertainty_weights(log_vars.detach()), 1 / losses, rtol=1e-3, atol=0)


def test_uncertainty_loss_matches_its_formula():
    s, losses = torch.tensor([0.3, -1.2]), torch.tensor([2.0, 0.5])
    expected = math.exp(-0.3) * 2.0 + 0.3 + math.exp(1.2) * 0.5 - 1.2
    assert uncertainty_loss(s, losses).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("perm", [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [1, 0, 2, 4, 3], [2, 4, 0, 3, 1]])
def test_spearman_matches_rank_difference_formula(perm):
    n = len(perm)
    expected = 1 - 6 * sum((i - p) ** 2 for i, p in enumerate(perm)) / (n * (n * n - 1))
    a = torch.tensor([0.1, 2.0, 3.5, 7.0, 9.0])
    b = torch.tensor([10.0 * (p + 1) ** 2 for p in perm])
    assert spearman(a, b) == pytest.approx(expected)


def test_spearman_of_a_constant_vector_is_undefined():
    assert spearman(torch.ones(4), torch.tensor([1.0, 2.0, 3.0, 4.0])) is None
    assert spearman(torch.tensor([1.0, 2.0]), torch.full((2,), 5.0)) is None


def test_sign_test_p_is_the_binomial_tail():
    assert sign_test_p(5, 5) == pytest.approx(1 / 32)
    assert sign_test_p(4, 5) == pytest.approx(6 / 32)
    assert sign_test_p(0, 7) == pytest.approx(1.0)


def test_improvement_counts_paired_wins():
    gain = improvement([1.0, 2.0, 3.0, 1.0, 1.0], [2.0, 2.5, 2.0, 3.0, 2.0])
    assert gain["wins"] == 4 and gain["seeds"] == 5
    assert gain["mean_difference"] == pytest.approx((1 + 0.5 - 1 + 2 + 1) / 5)
    assert gain["sign_test_p"] == pytest.approx(6 / 32)
    assert gain["holds"] is False
