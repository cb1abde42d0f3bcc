"""Simulator fidelity: does a calibrated cost model reproduce measured latencies?

Two workloads calibration never saw (Poisson arrivals, and bursty Gamma arrivals with
log-normal prompts; their own seeds, rates and lengths) run under fcfs and sarathi (a
256-token chunk budget, so its steps differ from fcfs's) with the paged allocator and a
512-token step budget, once on the real engine (measured clock: idle gaps skipped, each step's
compute timed) and once simulated with the cost model. Prints one row per workload,
scheduler, metric (TTFT, TPOT, E2E) and percentile (p50, p90): measured, simulated, error.
Exits 1 if any error exceeds --tolerance (default 10%).

Each configuration is measured --repeats times (default 5, round-robin): `measured` is the
mean of the runs, `spread` their range over that mean. Two real runs of the same workload on
this shared machine differ by up to ~15% in a p50 (the machine's speed moves by +-5-10%
within minutes), so the simulator, which is deterministic, is held to the mean; `spread`
says how far apart the real runs themselves were.

step_ratio is the cost model's price of the measured run's own steps over their measured
durations: 1 when each step is priced right, whatever the scheduling did; it shows how
much of an error is the machine's speed. A shared CPU's speed moves with other work, by
5-10% within minutes here and more at times, and a measured run moves with it. So by
default the calibration is interleaved with the measurements (`cl.sim.fidelity(...,
"calibrate")`): each round runs the calibration workloads, then every configuration once,
and the cost model is fitted on all rounds' calibration steps, so it saw the same spells of
load as the runs it is checked against. `--track-load` (with a cost model fitted before)
times a fixed probe (`cl.sim.probe_seconds`) before and after each measured run and
simulates that run with the cost model scaled by how much slower the probe ran than the
cost model predicts (`load_factor`); `error` is then that simulation's, `error_fixed` the
unscaled model's.

    python experiments/sim_fidelity.py                    # calibrate here, interleaved (~11 min)
    python experiments/sim_fidelity.py --cost-model default    # the shipped calibration
    python experiments/sim_fidelity.py --cost-model FILE       # a saved calibration
"""

# cortexlab must be imported before mlx: it loads the fast BLAS that MLX then binds to.
import cortexlab as cl  # noqa: I001

import argparse
import sys
import time

from cortexlab.workloads import LogNormal, Uniform

import pandas as pd


def fidelity_workloads(quick: bool = False) -> dict:
    """The workloads checked: none is a calibration workload (`cl.sim.calibration_workloads`)."""
    n = 12 if quick else 20
    return {
        "poisson": cl.workloads.poisson(
            1.0, num_requests=n, prompt_len=Uniform(16, 256), output_len=Uniform(16, 64), seed=1
        ),
        "gamma": cl.workloads.gamma(
            1.0,
            3.0,
            num_requests=n,
            prompt_len=LogNormal(120, 0.8, low=8, high=600),
            output_len=Uniform(8, 48),
            seed=2,
        ),
    }


def fidelity_schedulers(names: str) -> list:
    """Schedulers by name; sarathi gets a 256-token budget, half the engine's 512, so its
    steps (chunks and decodes within 256 tokens) differ from fcfs's and from calibration's."""
    known = {"sarathi": cl.schedulers.SarathiScheduler(token_budget=256)}
    return [known.get(n.strip(), n.strip()) for n in names.split(",") if n.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument(
        "--cost-model",
        default="calibrate",
        help="'calibrate' (fit here, interleaved with the runs; default), 'default' (shipped) "
        "or a JSON file",
    )
    parser.add_argument(
        "--schedulers", default="fcfs,sarathi", help="comma-separated (sjf also differs)"
    )
    parser.add_argument("--tolerance", type=float, default=0.10, help="largest |error| allowed")
    parser.add_argument("--quick", action="store_true", help="12 requests per workload, not 20")
    parser.add_argument(
        "--repeats", type=int, default=5, help="measured runs per configuration (mean compared)"
    )
    parser.add_argument("--save", default=None, help="write the table as CSV")
    parser.add_argument("--save-cost-model", default=None, help="write the calibration used")
    parser.add_argument(
        "--track-load",
        action="store_true",
        help="scale the cost model per run by a probe's slowdown (see above)",
    )
    args = parser.parse_args(argv)

    model = cl.load_model(args.model)
    engine = dict(cl.sim.CALIBRATION_ENGINE)
    t0 = time.perf_counter()
    if args.cost_model == "calibrate":
        print(
            f"calibrating, interleaved with {args.repeats} rounds of measured runs...",
            file=sys.stderr,
        )
        cost_model = "calibrate"
    elif args.cost_model == "default":
        cost_model = cl.sim.default_cost_model(model)
    else:
        cost_model = cl.sim.CostModel.load(args.cost_model, model)
    schedulers = fidelity_schedulers(args.schedulers)
    table = cl.sim.fidelity(
        model,
        fidelity_workloads(args.quick),
        cost_model,
        schedulers=schedulers,
        repeats=args.repeats,
        track_load=args.track_load,
        **engine,
    )
    cost_model = table.attrs["cost_model"]
    if args.cost_model == "calibrate":
        print(
            f"  fitted on {cost_model.info['num_points']} calibration steps, "
            f"step error mean {cost_model.info['mean_rel_error']:.1%}",
            file=sys.stderr,
        )
    if args.save_cost_model:
        cost_model.save(args.save_cost_model)
    shown = table.copy()
    if "measured_min" in shown:
        spread = (table["measured_max"] - table["measured_min"]) / table["measured"]
        shown = shown.drop(columns=["measured_min", "measured_max"])
        shown.insert(shown.columns.get_loc("measured") + 1, "spread", spread)
        shown["spread"] = (100 * shown["spread"]).map(lambda e: f"{e:.1f}%")
    for column in ("error", "error_fixed"):
        if column in shown:
            shown[column] = (100 * shown[column]).map(lambda e: f"{e:+.1f}%")
    with pd.option_context("display.width", 150, "display.float_format", "{:.3f}".format):
        print(shown.to_string(index=False))
    worst = table["error"].abs().max()
    fixed = f", unscaled {table['error_fixed'].abs().max():.1%}" if "error_fixed" in table else ""
    spread = ""
    if "measured_min" in table:
        widest = ((table["measured_max"] - table["measured_min"]) / table["measured"]).max()
        spread = f"; widest spread of the {args.repeats} real runs {widest:.1%}"
    print(
        f"\nworst |error| {worst:.1%}{fixed} (tolerance {args.tolerance:.0%}){spread}; "
        f"engine {engine}; {time.perf_counter() - t0:.0f} s"
    )
    if args.save:
        table.to_csv(args.save, index=False)
    return 1 if worst > args.tolerance else 0


if __name__ == "__main__":
    raise SystemExit(main())
