"""Scheduler study: do the orderings the literature predicts hold on the real model?

Three scenarios, each a workload built to expose one effect, run through fcfs and the
policy that claims to fix it (measured clock, greedy, exact output lengths):

1. SJF vs FCFS, heavy-tailed output lengths queued behind a small `max_num_seqs`:
   shortest-job-first should lower the mean end-to-end latency (head-of-line blocking).
2. Sarathi vs FCFS, long prompts arriving while short requests decode: stall-free batching
   (decodes first, prefill chunks within a token budget) should lower the p99 TPOT.
3. Fair (VTC) vs FCFS, one heavy tenant sending 4x the requests of a light one: per-tenant
   virtual token counters should shrink the service gap between backlogged tenants.

Each scenario also runs at several loads (`--loads`) so the effect is seen as a function of
load. Writes results/scheduler_study/ (summary.csv, per-scenario CSVs, figures, report.html).

    python experiments/scheduler_study.py [--model tiny-random] [--quick] [--out results]
"""

# cortexlab must be imported before mlx: it loads the fast BLAS that MLX then binds to.
import cortexlab as cl  # noqa: I001

import argparse
import sys
from pathlib import Path

from cortexlab.workloads import Fixed, LogNormal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def scenarios(quick: bool) -> list[dict]:
    """Each scenario: its workload factory, the policies, engine limits and the metric."""
    n = 12 if quick else 24

    def heavy_tail(rate, seed):
        return cl.workloads.gamma(
            rate,
            2.0,
            num_requests=n,
            prompt_len=LogNormal(32, 0.5, low=8, high=128),
            output_len=LogNormal(12, 1.2, low=2, high=160),
            seed=seed,
        )

    def long_prompts(rate, seed):
        # Short prompts with long outputs keep decodes running; every fourth request is a
        # long prompt that FCFS prefills in one step, stalling those decodes.
        decoders = cl.workloads.poisson(
            rate, num_requests=n, prompt_len=Fixed(16), output_len=Fixed(48), seed=seed
        ).to_frame()
        decoders.loc[decoders.index % 4 == 3, ["prompt_len", "output_len"]] = [768, 4]
        return cl.workloads.replay(decoders.drop(columns=["index"]), seed=seed)

    def two_tenants(rate, seed):
        return cl.workloads.poisson(
            rate,
            num_requests=n,
            prompt_len=LogNormal(48, 0.5, low=8, high=192),
            output_len=LogNormal(24, 0.6, low=4, high=96),
            tenants={"heavy": 4, "light": 1},
            seed=seed,
        )

    return [
        dict(
            name="sjf_vs_fcfs",
            workload=heavy_tail,
            rate=4.0,
            policies=["fcfs", "sjf"],
            engine=dict(max_num_seqs=4),
            metric="e2e_mean",
            steps_metric="e2e_steps_mean",
            claim="SJF's mean E2E below FCFS's",
        ),
        dict(
            name="sarathi_vs_fcfs",
            workload=long_prompts,
            rate=2.0,
            policies=["fcfs", cl.schedulers.SarathiScheduler(token_budget=128)],
            engine=dict(max_num_seqs=16),
            metric="tpot_p99",
            steps_metric=None,  # a stall lengthens a step; it adds none
            claim="sarathi's p99 TPOT below FCFS's",
        ),
        dict(
            name="fair_vs_fcfs",
            workload=two_tenants,
            rate=4.0,
            policies=["fcfs", "fair"],
            engine=dict(max_num_seqs=4),
            metric="service_gap",
            steps_metric=None,
            claim="fair's per-tenant service gap below FCFS's",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--quick", action="store_true", help="12 requests per run (default: 24)")
    parser.add_argument("--loads", default="0.5,1,2", help="rate multipliers (default: 0.5,1,2)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    parser.add_argument(
        "--scenarios",
        default="sjf_vs_fcfs,sarathi_vs_fcfs,fair_vs_fcfs",
        help="comma-separated scenario names (default: all three)",
    )
    args = parser.parse_args()
    cl.seed(args.seed)
    model = cl.load_model(args.model)
    loads = [float(x) for x in args.loads.split(",")]
    folder = Path(args.out) / "scheduler_study"
    folder.mkdir(parents=True, exist_ok=True)
    rows, figures = [], {}
    chosen = args.scenarios.split(",")
    for sc in [sc for sc in scenarios(args.quick) if sc["name"] in chosen]:
        table = cl.sweep(
            model,
            sc["workload"],
            schedulers=sc["policies"],
            rates=[sc["rate"] * x for x in loads],
            seeds=[args.seed],
            slo={"ttft": 2.0, "tpot": 0.25},
            cache_dir=Path(args.out) / ".cache",
            **sc["engine"],
        )
        table.to_csv(folder / f"{sc['name']}.csv", index=False)
        for rate, runs in table.groupby("rate"):
            by = runs.set_index("scheduler")
            other = next(name for name in by.index if name != "fcfs")
            row = {
                "scenario": sc["name"],
                "rate": rate,
                "metric": sc["metric"],
                "policy": other,
                "fcfs": by.loc["fcfs", sc["metric"]],
                "value": by.loc[other, sc["metric"]],
            }
            row["holds"] = bool(row["value"] < row["fcfs"])
            if sc["steps_metric"]:
                row["steps_metric"] = sc["steps_metric"]
                row["fcfs_steps"] = by.loc["fcfs", sc["steps_metric"]]
                row["value_steps"] = by.loc[other, sc["steps_metric"]]
            rows.append(row)
        fig, ax = plt.subplots(figsize=(6, 4))
        cl.viz.plot_goodput_vs_load(table, x="rate", y=sc["metric"], hue="scheduler", ax=ax)
        ax.set_title(f"{sc['name']}: {sc['claim']}")
        figures[sc["name"]] = fig
        fig.savefig(folder / f"{sc['name']}.png", dpi=100, bbox_inches="tight")
    summary = pd.DataFrame(rows)
    summary.to_csv(folder / "summary.csv", index=False)
    with pd.option_context("display.width", 140):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    report = cl.report.write_report(
        folder / "report.html",
        title="Scheduler study",
        summary=summary,
        figures=figures,
        notes={"model": model.name, "loads": args.loads, "quick": str(args.quick)},
    )
    print(f"\nresults: {folder}/  report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
