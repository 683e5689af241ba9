"""The digits experiment (``python -m gradnorm_func.repro --experiment digits``): the data
against an independent reconstruction from scikit-learn's images, each baseline's formula
against a hand computation, Delta_m, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import r2_score

from gradnorm_func.repro import digits_report
from gradnorm_func.repro.__main__ import main
from gradnorm_func.repro.digits import (
    METHODS,
    NAMES,
    digits_losses,
    digits_metrics,
    log_c_initial_losses,
    make_digits_data,
    train_digits,
    weighting,
)
from gradnorm_func.repro.dwa import dwa_weights
from gradnorm_func.repro.training import TrainConfig
from gradnorm_func.repro.uncertainty import uncertainty_loss
from gradnorm_func.repro.verdicts import delta_m


@pytest.fixture(scope="module")
def data():
    return make_digits_data(seed=3, n_train=300, n_test=120)


def test_train_and_test_canvases_come_from_disjoint_source_images(data):
    train, test = set(data.sources_train.flatten().tolist()), set(data.sources_test.flatten().tolist())
    assert train.isdisjoint(test)
    assert len(train) > 200 and len(test) > 80  # many distinct sources on each side


def test_canvases_and_labels_match_a_reconstruction_from_their_sources(data):
    digits = load_digits()
    for x, y, (a, b) in [*zip(data.x_train, data.y_train, data.sources_train.tolist()),
                         *zip(data.x_test, data.y_test, data.sources_test.tolist())]:
        canvas = np.zeros((12, 12))
        canvas[:8, :8] = digits.images[a] / 16
        canvas[4:, 4:] = np.maximum(canvas[4:, 4:], digits.images[b] / 16)
        np.testing.assert_allclose(x.numpy().reshape(12, 12), canvas, atol=1e-6)
        la, lb = int(digits.target[a]), int(digits.target[b])
        assert y[:3].tolist() == [la, lb, (la + lb) % 2]
        assert float(y[3]) == pytest.approx(canvas.sum(), rel=1e-5)


def test_ink_loss_starts_over_100_times_the_classification_losses(data):
    initial = log_c_initial_losses(data.y_train)
    torch.testing.assert_close(initial[:3], torch.tensor([math.log(10), math.log(10), math.log(2)]))
    assert initial[3] > 100 * initial[:3].max()
    assert initial[3] == pytest.approx(float((data.y_train[:, 3] ** 2).mean()))


def test_losses_and_metrics_match_hand_computations():
    gen = torch.Generator().manual_seed(0)
    output = torch.randn(6, 4, 10, generator=gen)
    y = torch.tensor([[d % 10, (3 * d) % 10, d % 2, 30.0 + d] for d in range(6)], dtype=torch.float32)
    losses, metrics = digits_losses(output, y), digits_metrics(output, y)
    for i, classes in enumerate((10, 10, 2)):
        logits, labels = output[:, i, :classes], y[:, i].long()
        ce = sum(math.log(float(torch.exp(row).sum())) - float(row[k])
                 for row, k in zip(logits, labels)) / 6
        assert float(losses[i]) == pytest.approx(ce, rel=1e-5)
        correct = sum(int(row.argmax()) == int(k) for row, k in zip(logits, labels))
        assert float(metrics[i]) == pytest.approx(correct / 6)
    assert float(losses[3]) == pytest.approx(float(((output[:, 3, 0] - y[:, 3]) ** 2).mean()))
    assert float(metrics[3]) == pytest.approx(r2_score(y[:, 3].numpy(), output[:, 3, 0].numpy()),
                                              rel=1e-5)


def test_dwa_matches_liu_et_al_eq_7_by_hand():
    before, last = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, 2.0, 2.0])
    r = [0.5, 1.0, 0.5]  # L(e-1) / L(e-2)
    expected = [3 * math.exp(ri / 2) / sum(math.exp(rj / 2) for rj in r) for ri in r]
    torch.testing.assert_close(dwa_weights([before, last], 3), torch.tensor(expected))
    torch.testing.assert_close(dwa_weights([torch.ones(3), before, last], 3), torch.tensor(expected))
    torch.testing.assert_close(dwa_weights([before], 3), torch.ones(3))
    torch.testing.assert_close(dwa_weights([], 2), torch.ones(2))


def test_uncertainty_gradient_and_kendall_classification_form_by_hand():
    s, losses = torch.tensor([0.4, -0.7], requires_grad=True), torch.tensor([2.5, 0.3])
    uncertainty_loss(s, losses).backward()
    expected = [1 - math.exp(-0.4) * 2.5, 1 - math.exp(0.7) * 0.3]  # d/ds (e^-s L + s)
    torch.testing.assert_close(s.grad, torch.tensor(expected))
    # Kendall et al.'s classification term e^-s L + s/2 is half of this form at s - log 2,
    # plus log(2)/2 (uncertainty.py's docstring).
    for s_k, loss in [(0.3, 2.0), (-1.1, 0.4)]:
        kendall = math.exp(-s_k) * loss + s_k / 2
        shifted = uncertainty_loss(torch.tensor([s_k - math.log(2)]), torch.tensor([loss]))
        assert kendall == pytest.approx(float(shifted) / 2 + math.log(2) / 2)


def test_delta_m_matches_a_hand_computation():
    # (+0.3/0.5 + 0/0.5 - (-0.1)/1.0) / 3, the third metric lower-is-better
    assert delta_m([0.8, 0.5, 0.9], [0.5, 0.5, 1.0], [False, False, True]) == pytest.approx(0.7 / 3)
    assert delta_m([0.5, 0.5], [0.5, 0.5], [False, True]) == 0.0
    with pytest.raises(ValueError):
        delta_m([0.5], [0.5, 0.5], [False, False])


def test_gradnorm_variants_are_the_library_defaults_log_c_and_the_alphas(data):
    assert weighting("gradnorm", data.y_train) == ("gradnorm", 1.5, None)
    logc = weighting("gradnorm_logc", data.y_train)
    torch.testing.assert_close(logc.initial_losses, log_c_initial_losses(data.y_train))
    assert [weighting(m, data.y_train).alpha for m in ("gradnorm_a0", "gradnorm_a0.5")] == [0.0, 0.5]


def test_dwa_keeps_equal_weights_for_two_epochs_then_follows_the_losses(data):
    """With w = 1 for two epochs, DWA trains exactly as equal weights do (same init, same
    batches); from the third epoch on its weights are constant within an epoch and sum to T."""
    config = TrainConfig(steps=9, batch_size=100, eval_every=1)  # 3 steps an epoch
    dwa, equal = (train_digits(m, data, seed=0, config=config) for m in ("dwa", "equal"))
    torch.testing.assert_close(dwa.test_losses[:7], equal.test_losses[:7])
    assert torch.equal(dwa.weights[:6], torch.ones(6, 4))
    assert not torch.equal(dwa.weights[6], torch.ones(4))
    assert torch.equal(dwa.weights[6], dwa.weights[8])
    torch.testing.assert_close(dwa.weights[6].sum(), torch.tensor(4.0))


def test_digits_command_writes_figure_table_and_json(tmp_path, capsys):
    result = main(["--experiment", "digits", "--out", str(tmp_path), "--seeds", "2", "--steps", "6",
                   "--eval-every", "3", "--digits-n-train", "200", "--digits-n-test", "50",
                   "--batch-size", "20", "--threads", "1"])
    assert set(result) == {"digits"}
    figure = tmp_path / "figures" / "digits.png"
    assert 1000 < figure.stat().st_size < 200_000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["seeds"] == [0, 1]
    methods = summary["summary"]["methods"]
    assert list(methods) == list(METHODS)
    for m in methods.values():
        assert len(m["final_test_metrics"]) == 2 and all(len(f) == 4 for f in m["final_test_metrics"])
        assert len(m["delta_m"]) == 2 and len(m["seconds_per_step"]) == 2
        assert m["eval_steps"] == [0, 3, 6] and len(m["mean_weights_at_eval_steps"]) == 2
        # every method starts from the same initialisation
        assert m["mean_test_metrics"][0] == methods["equal"]["mean_test_metrics"][0]
    assert methods["equal"]["delta_m"] == [0.0, 0.0]
    pairs = {(v["method"], v["baseline"]) for v in summary["verdicts"]}
    assert {("gradnorm", b) for b in ("equal", "uncertainty", "dwa")} <= pairs
    assert {("gradnorm_a0", "equal"), ("gradnorm_a0.5", "equal")} <= pairs
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {NAMES[m]} |" in table for m in METHODS)
    printed = capsys.readouterr().out
    assert "GradNorm (defaults)" in printed and "Delta_m over equal weights" in printed
    assert "sign test p = " in printed and "{" not in printed


def test_all_runs_both_experiments_into_subfolders(tmp_path):
    result = main(["--experiment", "all", "--out", str(tmp_path), "--seeds", "1", "--steps", "2",
                   "--n-train", "40", "--n-test", "10", "--tasks", "3", "--digits-n-train", "40",
                   "--digits-n-test", "10", "--batch-size", "20", "--threads", "1"])
    assert set(result) == {"toy", "digits"}
    for name in ("toy", "digits"):
        assert (tmp_path / name / "summary.json").exists()
        assert (tmp_path / name / "table.md").exists()


def test_verdict_sentence_names_the_numbers_and_the_tasks_that_pay():
    verdict = {"method": "gradnorm", "baseline": "equal", "holds": True, "wins": 5, "seeds": 5,
               "sign_test_p": 1 / 32, "mean_difference": 0.123,
               "mean_delta_m": {"gradnorm": 0.123, "equal": 0.0},
               "mean_final_test_metrics": {"gradnorm": [0.8, 0.7, 0.9, 0.93],
                                           "equal": [0.71, 0.7, 0.9, 0.95]}}
    assert digits_report.verdict_sentence(verdict) == (
        "GradNorm (defaults) improves Delta_m over equal weights: +12.3% (better in 5/5 seeds, "
        "sign test p = 0.031): digit 1 accuracy 0.71 -> 0.8, digit 2 accuracy 0.7 -> 0.7, "
        "parity accuracy 0.9 -> 0.9, ink R^2 0.95 -> 0.93 (ink pays).")
    worse = {**verdict, "method": "uncertainty", "holds": False, "wins": 0, "sign_test_p": 1.0,
             "mean_difference": -0.05, "mean_delta_m": {"uncertainty": -0.05, "equal": 0.0},
             "mean_final_test_metrics": {"uncertainty": [0.6, 0.6, 0.9, 0.95],
                                         "equal": [0.71, 0.7, 0.9, 0.95]}}
    assert digits_report.verdict_sentence(worse).startswith(
        "Uncertainty weighting does not improve Delta_m over equal weights: -5.0% (better in "
        "0/5 seeds, sign test p = 1.000)")
    assert digits_report.verdict_sentence(worse).endswith("(digit 1 and digit 2 pay).")
