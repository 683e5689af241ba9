"""Multi-process GradNorm on CPU (gloo): identical weights on every rank, equal to one process.

The workers (``ddp_workers.py``) run real ``DistributedDataParallel`` training in 2 and 3
processes started with ``torch.multiprocessing.spawn``; only loopback traffic.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import ddp_workers
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from versions import COMPILES_FULLGRAPH, counts_collectives

import gradnorm_func as gf

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")
EXACT = dict(rtol=1e-10, atol=1e-12)  # float64: the ranks' sums are reassociated


def child_env() -> dict[str, str]:
    """The environment for child interpreters, importing this checkout's package."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", params=[2, 3], ids=["2procs", "3procs"])
def ranks(request, tmp_path_factory) -> list[dict]:
    world = request.param
    out = tmp_path_factory.mktemp(f"ddp{world}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
        mp.spawn(ddp_workers.worker, args=(world, str(out), world == 2 and COMPILES_FULLGRAPH),
                 nprocs=world)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return ddp_workers.reference()


@pytest.fixture(scope="module")
def reference_heads() -> dict[str, torch.Tensor]:
    """The same with the separate heads' model (its initialisation differs)."""
    return ddp_workers.reference(separate_heads=True)


def assert_same_on_all_ranks(ranks: list[dict], run: str) -> None:
    for other in ranks[1:]:
        for key, value in ranks[0][run].items():
            assert torch.equal(other[run][key], value), f"{run}.{key} differs between ranks"


def test_weights_are_bit_identical_and_equal_to_one_process(ranks, reference):
    assert_same_on_all_ranks(ranks, "weighted")
    got = ranks[0]["weighted"]
    torch.testing.assert_close(got["weights"], reference["weights"], **EXACT)
    assert (got["weights"][-1] - 1).abs().max() > 1e-2  # the weights did move


@pytest.mark.parametrize("run", ["one-line", "one-line heads", "one-line fork"])
def test_one_line_flow_is_bit_identical_across_ranks_and_equals_one_process(ranks, reference,
                                                                          reference_heads, run):
    """``loss = gn(L_i); loss.backward()`` under DDP, without and with a fork (``heads=``,
    ``model.fork = gn.fork``): GradNorm's all-reduce runs at the end of each backward, after
    DDP's, in the same order on every rank; the weights equal one process's ``gn.step`` on
    the global batch, the uneven last batch included."""
    assert_same_on_all_ranks(ranks, run)
    got = ranks[0][run]
    assert got["counts"].tolist() == list(range(1, ddp_workers.STEPS + 1))
    expected = reference_heads if run == "one-line heads" else reference
    torch.testing.assert_close(got["weights"], expected["weights"], **EXACT)


def test_model_parameters_stay_in_sync(ranks):
    for run in ("weighted", "one-line heads"):
        for other in ranks[1:]:
            assert torch.equal(other[run]["params"], ranks[0][run]["params"]), run


def test_uneven_last_batch_without_batch_sizes_weights_ranks_equally(ranks, reference):
    # Even batches: equal to the global batch. The uneven last batch, without
    # ``local_batch_size``, averages the rank means (as DDP does): identical on all ranks,
    # but not the global-batch mean.
    assert_same_on_all_ranks(ranks, "unweighted")
    expected = reference["weights"]
    got = ranks[0]["unweighted"]["weights"]
    torch.testing.assert_close(got[:-1], expected[:-1], **EXACT)
    assert (got[-1] - expected[-1]).abs().max() > 1e-9


def test_nan_on_one_rank_skips_the_update_on_every_rank(ranks):
    assert_same_on_all_ranks(ranks, "poisoned")
    poisoned = ranks[0]["poisoned"]
    step = ddp_workers.NAN_STEP
    assert poisoned["skipped"][step] and not poisoned["skipped"][:step].any()
    assert not poisoned["skipped"][step + 1:].any()
    assert poisoned["counts"][step] == poisoned["counts"][step - 1]
    assert torch.equal(poisoned["weights"][step], poisoned["weights"][step - 1])
    assert torch.isfinite(poisoned["weights"]).all()


@counts_collectives
def test_accumulation_makes_one_all_reduce_per_window_and_equals_the_full_batch(ranks):
    """accumulation_steps=2 under DDP: GradNorm issues exactly one collective per window on
    its process group (plus, in the first window only, the one check that the ranks agree
    on T), none on the first micro-batch of a window, and the weights equal one process
    stepping once per window on the window's whole global batch."""
    assert_same_on_all_ranks(ranks, "accumulated")
    got = ranks[0]["accumulated"]
    windows, k = ddp_workers.WINDOWS, ddp_workers.MICRO_BATCHES
    # After each micro-batch: [0, 2, 2, 3, 3, 4] for 3 windows of 2 (check + sync, then sync).
    expected = [w + 1 + (m == k - 1) for w in range(windows) for m in range(k)]
    expected[0] = 0
    assert got["sequence"].tolist() == expected
    assert got["calls"].tolist() == expected  # the same count, by wrapping the functions
    assert int(got["updates"]) == windows
    torch.testing.assert_close(got["weights"], ddp_workers.accumulation_reference(), **EXACT)
    assert (got["weights"][-1] - 1).abs().max() > 1e-2


def test_functional_step_with_process_group_equals_one_process(ranks):
    expected = ddp_workers.functional_run(0, 1)
    runs = ["functional", "compiled"] if "compiled" in ranks[0] else ["functional"]
    for run in runs:  # "compiled": torch.compile(fullgraph=True) with functional collectives
        got = [result[run] for result in ranks]
        assert all(torch.equal(g, got[0]) for g in got[1:]), f"{run} differs between ranks"
        torch.testing.assert_close(got[0], expected[:len(got[0])], rtol=1e-5, atol=1e-6)


def test_ranks_that_disagree_on_the_task_count_raise_a_clear_error(ranks):
    for rank, result in enumerate(ranks):
        assert f"rank {rank} has T={2 + rank}" in result["mismatch"]
        assert f"T in [2, {1 + len(ranks)}]" in result["mismatch"]


def test_lightning_ddp_strategy_keeps_weights_identical(tmp_path):
    pytest.importorskip("lightning")
    subprocess.run([sys.executable, str(REPO / "examples" / "lightning_ddp.py"), "--out",
                    str(tmp_path), "--steps", "4"], env=child_env(), cwd=tmp_path, check=True,
                   timeout=240)
    weights = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert weights[0].shape == (4, 2)
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0][-1], torch.ones(2))


def test_torchrun_example_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",  # free port
                             "--nproc_per_node=2",
                             str(REPO / "examples" / "ddp_train.py"), "--steps", "5"],
                            env=child_env(), cwd=tmp_path, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    final = re.search(r"final weights (\[.*\]); max difference across ranks: (\S+)", result.stdout)
    assert final is not None, result.stdout
    assert final.group(2) == "0"  # bit-identical weights on both ranks
    assert ast.literal_eval(final.group(1)) != [1.0, 1.0]


def test_sync_options_and_sharded_layers_are_checked():
    layer = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="process_group.*sync=False"):
        gf.GradNorm(layer, 1.5, 2, sync=False, process_group=object())
    layer.weight._is_flat_param = True  # what FSDP's FlatParameter carries
    with pytest.raises(ValueError, match=r"\['weight'\].*sharded"):
        gf.GradNorm(layer, 1.5, 2)
    shared = {"layer": {"weight": layer.weight.detach(), "bias": layer.bias.detach()}}
    shared["layer"]["weight"]._is_flat_param = True
    with pytest.raises(ValueError, match=r"\['layer.weight'\].*sharded"):
        gf.task_gradients(shared, lambda p: p["layer"]["weight"].sum(1)[:2], num_tasks=2)
    layer = torch.nn.Linear(3, 2)
    gn = gf.GradNorm(layer, 1.5, 2, sync=True)
    with pytest.raises(RuntimeError, match="sync=True.*init_process_group"):
        gn.step(layer(torch.ones(4, 3)).mean(0))
    with pytest.raises(RuntimeError, match="sync=True.*init_process_group"):
        gn(layer(torch.ones(4, 3)).mean(0)).backward()
