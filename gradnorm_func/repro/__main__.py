"""python -m gradnorm_func.repro: GradNorm (Chen et al. 2018) against equal weights and other
loss weightings, over several seeds, with a verdict in sentences for each comparison.

  --experiment toy     the paper's toy regression (Section 4, Figure 2): T=2 with
                       sigma = (1, 100) and T=10 with sigma_i = |N(0, sigma_scale^2)|, for equal
                       weights, GradNorm (alpha 0.12) and uncertainty weighting; a verdict on
                       each of the paper's four claims.
  --experiment digits  two of scikit-learn's bundled 8x8 digits overlaid on one canvas; tasks
                       digit 1, digit 2 (10-class), parity of their sum (2-class) and the
                       canvas's ink (regression, loss 600x the others'); equal weights, GradNorm
                       (library defaults; L_i(0) = log C; alpha 0 and 0.5), uncertainty
                       weighting and DWA; verdicts on Delta_m.
  --experiment all     both, into OUT/toy and OUT/digits.

Quick by default (both experiments together take about two minutes on 2 CPU cores); --full
is the run of docs/reproduction.md. Seed s fixes the data, the initialisation and the
minibatch order of every method.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm  # type: ignore[import-untyped]

from gradnorm_func.repro import digits_report
from gradnorm_func.repro.digits import METHODS as DIGITS_METHODS
from gradnorm_func.repro.digits import NAMES as DIGITS_NAMES
from gradnorm_func.repro.digits import run_digits
from gradnorm_func.repro.experiment import METHODS, PAPER_ALPHA, Method, run_seeds
from gradnorm_func.repro.report import NAMES, figure, summarise, verdict_lines, write_outputs
from gradnorm_func.repro.toy import INPUT_LAWS, SCALE_READINGS, ToyData, draw_sigmas, make_data
from gradnorm_func.repro.training import (
    RunRecord,
    TrainConfig,
    all_losses_rise,
    normalised_test_loss,
)
from gradnorm_func.repro.verdicts import all_claims

EXPERIMENTS = ("toy", "digits", "all")
STEPS = {"toy": {"quick": 300, "full": 2000}, "digits": {"quick": 800, "full": 3000}}
COMMON = ("experiment", "full", "threads", "batch_size", "optimizer", "lr", "weight_lr")
OPTIONS = {"toy": COMMON + ("alpha", "input_law", "scale_reading", "n_train", "n_test", "tasks",
                            "sigma_scale", "sigma_seed"),
           "digits": COMMON + ("digits_n_train", "digits_n_test")}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows every option's default (options whose default
    depends on the experiment and mode state it in their help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gradnorm_func.repro", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--experiment", choices=EXPERIMENTS, default="toy",
                        help="which experiment to run")
    parser.add_argument("--full", action="store_true",
                        help="the long run of docs/reproduction.md instead of the quick one")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="output directory (summary.json, table.md, figures/); "
                             "--experiment all writes OUT/toy and OUT/digits")
    parser.add_argument("--seeds", type=int, default=5,
                        help="number of seeds, each fixing data, initialisation and batches")
    steps = "; ".join(f"{name} {s['quick']} quick, {s['full']} --full" for name, s in STEPS.items())
    parser.add_argument("--steps", type=int,
                        help=f"training steps per run (default: {steps})")
    parser.add_argument("--eval-every", type=int,
                        help="steps between test evaluations (default: steps // 50)")
    parser.add_argument("--batch-size", type=int, default=100, help="minibatch size")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                        help="network optimiser (also trains uncertainty's log-variances)")
    parser.add_argument("--lr", type=float, default=1e-3, help="network learning rate")
    parser.add_argument("--weight-lr", type=float, default=0.025,
                        help="GradNorm's Adam learning rate on the task weights")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; these models are small, and with other jobs on "
                             "the cores more threads than free cores slow a run many times over")
    toy = parser.add_argument_group("toy experiment (the settings the paper leaves unstated)")
    toy.add_argument("--alpha", type=float, default=PAPER_ALPHA,
                     help="GradNorm's alpha (the paper's toy value)")
    toy.add_argument("--input-law", choices=INPUT_LAWS, default="normal",
                     help="law of x: N(0, I), U(-1, 1)^250 or N(0, I/250)")
    toy.add_argument("--scale-reading", choices=SCALE_READINGS, default="variance",
                     help="whether N(0, 10) and N(0, 3.5) give the variance or the std")
    toy.add_argument("--n-train", type=int, default=10000, help="training set size")
    toy.add_argument("--n-test", type=int, default=2000, help="test set size")
    toy.add_argument("--tasks", type=int, default=10, help="T of the many-task problem")
    toy.add_argument("--sigma-scale", type=float, default=50.0,
                     help="sigma_i = |N(0, sigma_scale^2)| for the many-task problem")
    toy.add_argument("--sigma-seed", type=int, default=0, help="seed of those sigma_i")
    digits = parser.add_argument_group("digits experiment")
    digits.add_argument("--digits-n-train", type=int, default=5000,
                        help="training canvases, from the train pool of source images")
    digits.add_argument("--digits-n-test", type=int, default=1000,
                        help="test canvases, from the disjoint test pool")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace, experiment: str) -> tuple[list[int], TrainConfig]:
    """The seeds and training settings of one experiment: its preset, overridden by options."""
    steps = args.steps or STEPS[experiment]["full" if args.full else "quick"]
    config = TrainConfig(steps=steps, batch_size=args.batch_size, optimizer=args.optimizer,
                         lr=args.lr, weight_lr=args.weight_lr,
                         eval_every=args.eval_every or max(1, steps // 50))
    return list(range(args.seeds)), config


def settings_of(args: argparse.Namespace, experiment: str, seeds: list[int],
                config: TrainConfig) -> dict[str, Any]:
    return {**{k: getattr(args, k) for k in OPTIONS[experiment]}, "seeds": seeds,
            "steps": config.steps, "eval_every": config.eval_every}


def rising_note(problem: str, runs: dict[str, list[RunRecord]], names: dict[str, str],
                args: argparse.Namespace, experiment: str, steps: int) -> list[str]:
    """A plain note when every method's task-normalised test loss ends above its initial value."""
    if not all_losses_rise(runs):
        return []
    num_tasks = next(iter(runs.values()))[0].test_losses.shape[1]
    means = {m: sum(float(normalised_test_loss(r)[-1]) for r in rs) / len(rs)
             for m, rs in runs.items()}
    finals = ", ".join(f"{names[m]} {mean:.3g}" for m, mean in means.items())
    hint = (f" --full trains {STEPS[experiment]['full']} steps."
            if not args.full and not args.steps else "")
    return [f"Note: in this {steps}-step run, every method's test sum_i L_i/L_i(0) on {problem} "
            f"ends above its initial value {num_tasks} ({finals}): the losses rise over the run "
            f"for all methods, so the comparison is between methods that are all still worse "
            f"than at initialisation.{hint}"]


def print_lines(lines: list[str]) -> None:
    for line in lines:
        print(line.replace("**", ""))


def run_toy(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The toy experiment; writes ``out`` and returns its JSON summary."""
    start = time.perf_counter()
    seeds, config = resolve(args, "toy")
    problems = {"T=2": torch.tensor([1.0, 100.0]),
                f"T={args.tasks}": draw_sigmas(args.tasks, scale=args.sigma_scale,
                                               seed=args.sigma_seed)}
    runs: dict[str, dict[Method, list[RunRecord]]] = {}
    saturation: dict[str, list[float]] = {}
    with tqdm(total=len(problems) * len(seeds) * len(METHODS), desc="toy runs") as bar:
        for name, sigmas in problems.items():
            tqdm.write(f"toy {name}: sigma = {[round(s, 3) for s in sigmas.tolist()]}")

            def data_for_seed(seed: int, sigmas: torch.Tensor = sigmas,
                              name: str = name) -> ToyData:
                data = make_data(sigmas, seed=seed, n_train=args.n_train, n_test=args.n_test,
                                 input_law=args.input_law, scale_reading=args.scale_reading)
                saturation.setdefault(name, []).append(float(data.saturation))
                return data

            bar.set_postfix_str(name)
            runs[name] = run_seeds(data_for_seed, seeds, config=config, alpha=args.alpha,
                                   on_run=bar.update)
    (two, _), (ten, sig10) = ((runs[n], s) for n, s in problems.items())
    verdicts = all_claims(two, ten, sig10)
    summaries = {name: {**summarise(runs[name], sigmas), "saturation": saturation[name]}
                 for name, sigmas in problems.items()}
    notes = [note for name in problems
             for note in rising_note(name, {str(m): r for m, r in runs[name].items()}, NAMES,
                                     args, "toy", config.steps)]
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for name, sigmas in problems.items():
        title = (f"{name}, alpha={args.alpha}, x {args.input_law}, "
                 f"N(0, s) as {args.scale_reading}, {args.optimizer} lr={args.lr}, "
                 f"{len(seeds)} seeds")
        figure(runs[name], sigmas, title, figures / f"toy_{name.replace('=', '')}.png")
    settings = {**settings_of(args, "toy", seeds, config),
                "wall_time_s": round(time.perf_counter() - start, 1)}
    write_outputs(out, settings=settings, summaries=summaries, verdicts=verdicts, notes=notes)
    print("\nThe toy experiment (Chen et al. 2018, Section 4):")
    for name in problems:
        print(f"{name}: tanh saturation (share of |pre-activation| > 2) = "
              f"{sum(saturation[name]) / len(saturation[name]):.3f}")
    print_lines(notes + verdict_lines(verdicts))
    print(f"wrote {out}/summary.json, table.md and figures/ in {settings['wall_time_s']} s\n")
    return {"settings": settings, "problems": summaries, "verdicts": verdicts, "notes": notes}


def run_digits_experiment(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The digits experiment; writes ``out`` and returns its JSON summary."""
    start = time.perf_counter()
    seeds, config = resolve(args, "digits")
    with tqdm(total=len(seeds) * len(DIGITS_METHODS), desc="digits runs") as bar:

        def on_run(method: str, seed: int) -> None:
            bar.set_postfix_str(f"seed {seed}: {method}")
            bar.update()

        runs = run_digits(seeds, config=config, n_train=args.digits_n_train,
                          n_test=args.digits_n_test, on_run=on_run)
    summary = digits_report.summarise(runs)
    verdicts = digits_report.verdicts(summary)
    notes = (rising_note("the digits tasks", runs, DIGITS_NAMES, args, "digits", config.steps)
             + digits_report.conditioning_notes(summary))
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    title = (f"digits: {len(seeds)} seeds x {config.steps} steps, batch {config.batch_size}, "
             f"{args.optimizer} lr={args.lr}")
    digits_report.figure(runs, title, figures / "digits.png")
    settings = {**settings_of(args, "digits", seeds, config),
                "wall_time_s": round(time.perf_counter() - start, 1)}
    digits_report.write_outputs(out, settings=settings, summary=summary, verdict_list=verdicts,
                                notes=notes)
    print("\nThe digits experiment (Delta_m against equal weights, higher is better):")
    print_lines(notes + [digits_report.verdict_sentence(v) for v in verdicts]
                + [digits_report.timing_sentence(summary)])
    print(f"wrote {out}/summary.json, table.md and figures/ in {settings['wall_time_s']} s\n")
    return {"settings": settings, "summary": summary, "verdicts": verdicts, "notes": notes}


RUNNERS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "toy": run_toy, "digits": run_digits_experiment}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the chosen experiments, writes their outputs and returns their JSON summaries,
    keyed by experiment."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ("toy", "digits") if args.experiment == "all" else (args.experiment,)
    return {name: RUNNERS[name](args, args.out / name if args.experiment == "all" else args.out)
            for name in names}


if __name__ == "__main__":
    main()
