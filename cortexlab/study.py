"""The scheduler study behind `cortexlab compare` (the main job) and `experiments/`.

One workload (bursty arrivals, heavy-tailed output lengths, two tenants) runs through each
scheduler at several loads on the real model with the measured clock; the result directory
holds the summary at the middle load, the summary per load, every trace, the figures and one
self-contained HTML report.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cortexlab.experiment import Comparison, compare, sweep
from cortexlab.models.base import Model
from cortexlab.workloads import LogNormal, Workload, gamma, replay

import pandas as pd

# Columns printed on the terminal (the CSV and the report hold every column).
PRINTED = (
    "ttft_p50",
    "ttft_p99",
    "tpot_p99",
    "e2e_mean",
    "goodput_share",
    "num_preemptions",
    "service_gap",
    "e2e_steps_mean",
)


@dataclass
class CompareOptions:
    """Everything `cortexlab compare` takes; the defaults finish in ~2 minutes on 2 cores."""

    schedulers: tuple[str, ...] = ("fcfs", "sjf", "mlfq", "sarathi", "fair")
    allocator: str = "paged"
    workload: str = "gamma"  # or a replay CSV path
    rate: float = 6.0
    cv: float = 2.0
    loads: tuple[float, ...] = (0.5, 1.0, 2.0)
    num_requests: int = 16
    prompt_len: int = 48
    output_len: int = 16
    tenants: dict = field(default_factory=lambda: {"a": 3.0, "b": 1.0})
    slo_ttft: float = 2.0
    slo_tpot: float = 0.25
    seed: int = 0
    out: str = "results"
    name: str = "compare"
    engine: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CompareOptions:
        """Options from parsed `cortexlab compare` flags (ValueError naming a bad flag)."""
        tenants = {}
        for item in filter(None, args.tenants.split(",")):
            name, _, weight = item.partition(":")
            try:
                tenants[name] = float(weight or 1)
            except ValueError:
                raise ValueError(f"--tenants: {item!r} is not NAME:WEIGHT") from None
        for flag, value in (("--rate", args.rate), ("--num-requests", args.num_requests)):
            if not value > 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        loads = tuple(float(x) for x in args.loads.split(",") if x)
        if not loads or any(x <= 0 for x in loads):
            raise ValueError(f"--loads must be positive multipliers, got {args.loads!r}")
        options = cls(
            schedulers=tuple(s for s in args.schedulers.split(",") if s),
            allocator=args.allocator,
            workload=args.workload,
            rate=args.rate,
            cv=args.cv,
            loads=loads,
            num_requests=args.num_requests,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            tenants=tenants,
            slo_ttft=args.slo_ttft,
            slo_tpot=args.slo_tpot,
            seed=args.seed,
            out=args.out,
            name=args.name,
            engine={
                "block_size": args.block_size,
                "max_num_seqs": args.max_num_seqs,
                "max_num_batched_tokens": args.max_num_batched_tokens,
            },
        )
        from cortexlab.schedulers import schedulers

        for s in options.schedulers:
            schedulers.get(s)  # KeyError listing the known names
        options.build_workload(options.rate)  # bad workload parameters fail before the model loads
        return options

    @property
    def slo(self) -> dict:
        """The SLO every goodput number uses."""
        return {"ttft": self.slo_ttft, "tpot": self.slo_tpot}

    def build_workload(self, rate: float) -> Workload:
        """The study's workload at `rate` requests/s (a replay ignores the rate)."""
        if self.workload != "gamma":
            return replay(self.workload, seed=self.seed)
        return gamma(
            rate,
            self.cv,
            num_requests=self.num_requests,
            # Heavy-tailed outputs (lognormal, sigma 1): a few long jobs behind many short.
            prompt_len=LogNormal(self.prompt_len, 0.6, low=8, high=8 * self.prompt_len),
            output_len=LogNormal(self.output_len, 1.0, low=2, high=8 * self.output_len),
            tenants=self.tenants or None,
            seed=self.seed,
        )


def add_compare_flags(parser: argparse.ArgumentParser) -> None:
    """The `cortexlab compare` flags, each with its default in the help."""
    d = CompareOptions()

    def flag(name: str, help: str, **kwargs) -> None:
        default = kwargs.get("default")
        parser.add_argument(name, help=f"{help} (default: {default})", **kwargs)

    flag("--schedulers", "comma-separated scheduler names", default=",".join(d.schedulers))
    flag("--allocator", "KV allocator", default=d.allocator)
    flag("--workload", "'gamma' (bursty arrivals) or a replay CSV path", default=d.workload)
    flag("--rate", "mean arrival rate, requests/s, at load 1", type=float, default=d.rate)
    flag("--cv", "coefficient of variation of arrival gaps (1 = Poisson)", type=float, default=d.cv)
    flag("--loads", "comma-separated multipliers of --rate", default=",".join(map(str, d.loads)))
    flag("--num-requests", "requests per run", type=int, default=d.num_requests)
    flag("--prompt-len", "median prompt tokens (lognormal)", type=int, default=d.prompt_len)
    flag(
        "--output-len",
        "median output tokens (lognormal, heavy tail)",
        type=int,
        default=d.output_len,
    )
    flag("--tenants", "NAME:WEIGHT,... (empty: one tenant)", default="a:3,b:1")
    flag("--slo-ttft", "goodput SLO on time to first token, s", type=float, default=d.slo_ttft)
    flag("--slo-tpot", "goodput SLO on time per output token, s", type=float, default=d.slo_tpot)
    flag("--seed", "workload seed", type=int, default=d.seed)
    flag("--out", "output directory", default=d.out)
    flag("--name", "run name: results go to OUT/NAME", default=d.name)


def write_results(
    directory: Path, options: CompareOptions, comparison: Comparison, loads: pd.DataFrame
) -> Path:
    """summary.csv, load.csv, traces/, figures/ and report.html under `directory`."""
    from cortexlab import report, viz

    import matplotlib

    matplotlib.use("Agg")  # the command line never needs a screen
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    comparison.summary.to_csv(directory / "summary.csv")
    loads.to_csv(directory / "load.csv", index=False)
    options_dict = asdict(options)
    (directory / "options.json").write_text(json.dumps(options_dict, indent=2, default=str))
    for name, run in comparison.runs.items():
        folder = directory / "traces" / name
        folder.mkdir(parents=True, exist_ok=True)
        run.trace.requests.to_csv(folder / "requests.csv", index=False)
        run.trace.steps.to_csv(folder / "steps.csv", index=False)
        run.trace.request_events.to_csv(folder / "request_events.csv", index=False)
    figures = {}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric in zip(axes, ("ttft", "tpot", "e2e"), strict=True):
        comparison.plot_latency_cdf(metric, ax=ax)
    figures["Latency CDFs per policy"] = fig
    fig, ax = plt.subplots(figsize=(7, 4))
    viz.plot_goodput_vs_load(loads, x="rate", y="goodput_share", hue="scheduler", ax=ax)
    figures["Goodput vs load (share of requests within the SLO)"] = fig
    names = list(comparison.runs)
    for title, plot in (
        ("Request Gantt", viz.plot_gantt),
        ("Batch composition", viz.plot_batch_composition),
    ):
        fig, axes = plt.subplots(len(names), 1, figsize=(12, 3 * len(names)), squeeze=False)
        for ax, name in zip(axes[:, 0], names, strict=True):
            plot(comparison[name].trace, ax=ax)
            ax.set_title(f"{title}: {name}")
        fig.tight_layout()
        figures[f"{title} per policy"] = fig
    folder = directory / "figures"
    folder.mkdir(exist_ok=True)
    for title, fig in figures.items():
        slug = title.split(" (")[0].lower().replace(" ", "_").replace(":", "")
        fig.savefig(folder / f"{slug}.png", dpi=100, bbox_inches="tight")
    path = report.write_report(
        directory / "report.html",
        title=f"cortexlab compare: {options.name}",
        summary=comparison.summary,
        figures=figures,
        notes={"options": json.dumps(options_dict, default=str)},
        tables={"Summary per load": loads},
    )
    for fig in figures.values():
        plt.close(fig)
    return path


def run_compare(model: Model, options: CompareOptions) -> int:
    """The main job: compare, sweep the loads, write everything, print the summary."""
    workload = options.build_workload(options.rate)
    print(
        f"cortexlab compare: {model.name}, {len(workload)} requests "
        f"({workload.name}, {workload.summary()['total_output_tokens']} output tokens), "
        f"schedulers {', '.join(options.schedulers)}, loads {options.loads} x {options.rate}/s",
        file=sys.stderr,
    )
    comparison = compare(
        model,
        workload,
        list(options.schedulers),
        allocator=options.allocator,
        slo=options.slo,
        **options.engine,
    )
    directory = Path(options.out) / options.name
    rest = [x for x in options.loads if x != 1.0]
    loads = sweep(
        model,
        lambda rate, seed: options.build_workload(rate),
        schedulers=list(options.schedulers),
        rates=[options.rate * x for x in rest],
        allocators=[options.allocator],
        slo=options.slo,
        cache_dir=Path(options.out) / ".cache",
        **options.engine,
    )
    middle = comparison.summary.reset_index().rename(columns={"policy": "scheduler"})
    middle["rate"] = options.rate
    loads = pd.concat([loads, middle], ignore_index=True).sort_values(["scheduler", "rate"])
    report = write_results(directory, options, comparison, loads)
    shown = comparison.summary[[c for c in PRINTED if c in comparison.summary]]
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        print(shown.to_string(float_format=lambda v: f"{v:.3g}"))
    print(f"\nresults: {directory}/ (summary.csv, load.csv, traces/, figures/)")
    print(f"report:  {report}")
    return 0
