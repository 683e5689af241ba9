"""``python -m gradnorm_func.repro``: re-runs the toy experiment of Chen et al. (2018),
Section 4 / Figure 2, and prints a verdict on each of the paper's four claims.

Runs T=2 with sigma = (1, 100) and T=10 with sigma_i = |N(0, sigma_scale^2)| (seeded, printed),
for equal weights, GradNorm (alpha = 0.12) and uncertainty weighting, over several seeds. The
default is a quick run (about a minute on 2 CPU cores); ``--full`` is the README's run. The
settings the paper leaves unstated are options; see the README for what each reading gives.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm  # type: ignore[import-untyped]

from gradnorm_func.repro.experiment import METHODS, Method, RunRecord, TrainConfig, run_seeds
from gradnorm_func.repro.report import figure, summarise, verdict_lines, write_outputs
from gradnorm_func.repro.toy import INPUT_LAWS, SCALE_READINGS, draw_sigmas, make_data
from gradnorm_func.repro.verdicts import all_claims

QUICK = {"seeds": 5, "steps": 300}
FULL = {"seeds": 5, "steps": 2000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gradnorm_func.repro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help=f"the README run: {FULL['seeds']} seeds x {FULL['steps']} steps "
                             f"(default: {QUICK['seeds']} seeds x {QUICK['steps']} steps)")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="output directory (summary.json, table.md, figures/)")
    parser.add_argument("--seeds", type=int, help="number of seeds (data, init and batches)")
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                        help="network optimiser (also trains uncertainty's log-variances)")
    parser.add_argument("--lr", type=float, default=1e-3, help="network learning rate")
    parser.add_argument("--alpha", type=float, default=0.12)
    parser.add_argument("--weight-lr", type=float, default=0.025,
                        help="GradNorm's Adam learning rate on the task weights")
    parser.add_argument("--input-law", choices=INPUT_LAWS, default="normal")
    parser.add_argument("--scale-reading", choices=SCALE_READINGS, default="variance",
                        help="whether N(0, 10) and N(0, 3.5) give the variance or the std")
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=10, help="T of the many-task problem")
    parser.add_argument("--sigma-scale", type=float, default=50.0,
                        help="sigma_i = |N(0, sigma_scale^2)| for the many-task problem")
    parser.add_argument("--sigma-seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, help="steps between test evaluations")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    preset = FULL if args.full else QUICK
    args.seeds = args.seeds or preset["seeds"]
    args.steps = args.steps or preset["steps"]
    args.eval_every = args.eval_every or max(1, args.steps // 50)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the reproduction, writes its outputs to ``--out`` and returns the JSON summary."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, optimizer=args.optimizer,
                         lr=args.lr, alpha=args.alpha, weight_lr=args.weight_lr,
                         eval_every=args.eval_every)
    problems = {"T=2": torch.tensor([1.0, 100.0]),
                f"T={args.tasks}": draw_sigmas(args.tasks, scale=args.sigma_scale,
                                               seed=args.sigma_seed)}
    seeds = list(range(args.seeds))
    runs: dict[str, dict[Method, list[RunRecord]]] = {}
    saturation: dict[str, list[float]] = {}
    with tqdm(total=len(problems) * len(seeds) * len(METHODS), desc="runs") as bar:
        for name, sigmas in problems.items():
            tqdm.write(f"{name}: sigma = {[round(s, 3) for s in sigmas.tolist()]}")

            def data_for_seed(seed: int, sigmas: torch.Tensor = sigmas) -> Any:
                data = make_data(sigmas, seed=seed, n_train=args.n_train, n_test=args.n_test,
                                 input_law=args.input_law, scale_reading=args.scale_reading)
                saturation.setdefault(name, []).append(float(data.saturation))
                return data

            runs[name] = run_seeds(data_for_seed, seeds, config=config, on_run=bar.update)
    (two, sig2), (ten, sig10) = ((runs[n], s) for n, s in problems.items())
    verdicts = all_claims(two, ten, sig10)
    summaries = {name: {**summarise(runs[name], sigmas), "saturation": saturation[name]}
                 for name, sigmas in problems.items()}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["seeds"] = seeds
    figures = args.out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for name, sigmas in problems.items():
        title = (f"{name}, alpha={args.alpha}, x {args.input_law}, N(0, s) as {args.scale_reading}, "
                 f"{args.optimizer} lr={args.lr}, {args.seeds} seeds")
        figure(runs[name], sigmas, title, figures / f"toy_{name.replace('=', '')}.png")
    settings["wall_time_s"] = round(time.perf_counter() - start, 1)
    write_outputs(args.out, settings=settings, summaries=summaries, verdicts=verdicts)
    for name in problems:
        tqdm.write(f"{name}: tanh saturation (share of |pre-activation| > 2) = "
                   f"{sum(saturation[name]) / len(saturation[name]):.3f}")
    print("\n".join(line.replace("**", "").replace("  \n", "\n    ") for line in verdict_lines(verdicts)))
    print(f"wrote {args.out}/summary.json, table.md and figures/ in {settings['wall_time_s']} s")
    return {"settings": settings, "problems": summaries, "verdicts": verdicts}


if __name__ == "__main__":
    main()
