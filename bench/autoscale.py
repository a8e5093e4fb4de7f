"""One multi-LoRA deployment against one deployment per fine-tuned model, autoscaled alike.

A day of synthetic traffic (seeded) for many fine-tuned models of one base: each model has
its own mean rate (a few popular, most rarely used), a diurnal cycle in one of three time
zones, office hours for some, and bursts. Each simulated BaseModelDeployment is driven by the
operator's own code: every tick its ready pods are scraped into a `RateTracker` and `decide`
sets its replicas; new pods serve after a startup delay; requests beyond the ready capacity
wait (in the pods' queues, or held by the router at zero) and count as over capacity.

Setups: `consolidated` (one deployment serves every model as adapters, minReplicas 1, each
replica a little slower by the multi-LoRA overhead), `dedicated` (one deployment per model,
minReplicas 1) and `dedicated-zero` (one per model, minReplicas 0, scale to zero when idle).

    python bench/autoscale.py             # 30 models for 24 h, a sweep of 1..100 models, plots
    python bench/autoscale.py --quick     # a smoke run, a few seconds, no plots
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from loraplane.api import AutoscalingSpec, format_milli
from loraplane.operator.autoscaler import ScaleState, decide
from loraplane.operator.rates import PodSample, RateTracker

DAY = 86400.0
SETUPS = ("consolidated", "dedicated", "dedicated-zero")
# Three regions' working days, as a fraction of a UTC day where their traffic peaks.
ZONES = (0.55, 0.8, 0.25)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=30, help="models in the day plotted and tabled")
    p.add_argument("--sweep", default="1,2,5,10,20,30,50,75,100", help="model counts to sweep")
    p.add_argument("--hours", type=float, default=24.0, help="simulated time")
    p.add_argument("--tick", type=float, default=10.0, help="seconds between scrape+decide")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--capacity-rps", type=float, default=4.0, help="requests/s one GPU serves for one model"
    )
    p.add_argument("--tokens-per-request", type=int, default=600, help="prompt + generated")
    p.add_argument(
        "--multi-lora-efficiency",
        type=float,
        default=0.84,
        help="a consolidated replica's capacity over a dedicated one's (docs/benchmarks.md: "
        "ideal decode ratio at 32 distinct rank-16 adapters, 0.839)",
    )
    p.add_argument(
        "--target-utilization", type=float, default=0.7, help="targetRequestsPerSecond / capacity"
    )
    p.add_argument("--startup-seconds", type=float, default=120.0, help="pod start to serving")
    p.add_argument("--request-seconds", type=float, default=8.0, help="time a request runs")
    p.add_argument("--idle-seconds", type=int, default=900, help="scaleToZeroIdleSeconds")
    p.add_argument("--gpu-hour-price", type=float, default=2.5, help="USD per GPU-hour")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", type=Path, default=Path("docs"), help="where the PNGs go")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 h, 1..10 models, no plots")
    args = p.parse_args(argv)
    if args.quick:
        args.hours, args.models, args.sweep, args.no_plots = 3.0, 5, "1,5,10", True
    args.sweep_counts = sorted({int(n) for n in args.sweep.split(",")} | {args.models})
    return args


# ---- traffic ------------------------------------------------------------------------------------


def model_rates(seed: int, model: int, times: np.ndarray, hours: float) -> np.ndarray:
    """Requests per second of one model at each time: its own, whatever other models do."""
    rng = np.random.default_rng([seed, model])
    mean = math.exp(rng.normal(-1.2, 1.1))  # median 0.3 req/s, a few models above 3
    peak = ZONES[rng.integers(len(ZONES))] + rng.normal(0, 0.02)
    swing = rng.uniform(0.5, 0.95)
    rate = mean * (1 + swing * np.cos(2 * np.pi * (times / DAY - peak)))
    if rng.random() < 0.3:  # used in office hours only (a team's internal tool)
        rate *= np.cos(2 * np.pi * (times / DAY - peak)) > -0.1
    for _ in range(rng.poisson(hours / 4)):  # bursts: a batch job, a launch, a retry storm
        start, length = rng.uniform(0, hours * 3600), np.clip(rng.exponential(600), 60, 3600)
        extra = max(mean * rng.uniform(4, 12), rng.uniform(0.5, 3))
        rate += extra * ((times >= start) & (times < start + length))
    return rate


def arrivals(args: argparse.Namespace, models: int) -> np.ndarray:
    """Requests arriving per tick: [models, ticks]."""
    times = np.arange(int(args.hours * 3600 / args.tick)) * args.tick
    rng = np.random.default_rng([args.seed, 10**6])
    rates = np.stack([model_rates(args.seed, m, times, args.hours) for m in range(models)])
    return rng.poisson(rates * args.tick)


# ---- one simulated BaseModelDeployment ----------------------------------------------------------


@dataclass
class Run:
    """What one deployment did, tick by tick."""

    pods: np.ndarray  # pods that exist (GPUs paid for), per tick
    ready: np.ndarray  # pods serving, per tick
    served: float
    delayed: float  # requests that arrived beyond the ready capacity and had to wait
    waited: float  # request-seconds spent waiting
    arrived: float
    reasons: Counter[str]


@dataclass
class Pod:
    name: str
    ready_at: float
    requests: float = 0.0


def simulate(
    spec: AutoscalingSpec, capacity: float, arriving: np.ndarray, args: argparse.Namespace
) -> Run:
    tick, tracker = args.tick, RateTracker()
    state: ScaleState | None = None
    first = max(spec.min_replicas, 1)
    pods = [Pod(f"p{i}", -args.startup_seconds) for i in range(first)]
    made, backlog, served_total, delayed, waited = first, 0.0, 0.0, 0.0, 0.0
    n = len(arriving)
    pods_series, ready_series = np.zeros(n, np.int32), np.zeros(n, np.int32)
    reasons: Counter[str] = Counter()
    for k in range(n):
        now = (k + 1) * tick
        serving = [p for p in pods if p.ready_at <= now - tick]
        room = len(serving) * capacity * tick
        new = float(arriving[k])
        delayed += max(0.0, new - max(0.0, room - backlog))
        served = min(backlog + new, room)
        backlog += new - served
        waited += backlog * tick
        samples: dict[str, PodSample | None] = {}
        for p in serving:
            p.requests += served / len(serving)
            queued = round(backlog / len(serving))
            running = round(served / len(serving) / tick * args.request_seconds)
            samples[p.name] = PodSample(p.requests, in_flight=running + queued, queued=queued)
        for p in pods:  # ready now, scraped for a baseline before it serves
            if p.name not in samples and p.ready_at <= now:
                samples[p.name] = PodSample(p.requests)
        tracker.observe(now, samples, held=0 if serving else round(backlog))
        load = tracker.load(spec.stable_window_seconds, spec.panic_window_seconds)
        d = decide(spec, len(pods), load, state, now)
        state = d.state
        reasons[d.reason] += 1
        while len(pods) < d.desired:
            pods.append(Pod(f"p{made}", now + args.startup_seconds))
            made += 1
        if len(pods) > d.desired:  # the Deployment removes pods not yet ready first
            pods.sort(key=lambda p: (p.ready_at <= now, -p.ready_at))
            del pods[: len(pods) - d.desired]
        pods_series[k], ready_series[k] = len(pods), len(serving)
        served_total += served
    arrived = float(arriving.sum())
    return Run(pods_series, ready_series, served_total, delayed, waited, arrived, reasons)


def spec_for(setup: str, capacity: float, args: argparse.Namespace) -> AutoscalingSpec:
    return AutoscalingSpec(
        enabled=True,
        min_replicas=0 if setup == "dedicated-zero" else 1,
        max_replicas=1000,
        target_requests_per_second=format_milli(capacity * args.target_utilization),
        scale_to_zero_idle_seconds=args.idle_seconds,
    )


def capacity_of(setup: str, args: argparse.Namespace) -> float:
    eff = args.multi_lora_efficiency if setup == "consolidated" else 1.0
    return args.capacity_rps * eff


def run_one(job: tuple[str, np.ndarray, argparse.Namespace]) -> Run:
    setup, arriving, args = job
    capacity = capacity_of(setup, args)
    return simulate(spec_for(setup, capacity, args), capacity, arriving, args)


# ---- results ------------------------------------------------------------------------------------


@dataclass
class Result:
    setup: str
    models: int
    pods: np.ndarray
    served: float
    delayed: float
    waited: float
    arrived: float
    reasons: Counter[str]

    @classmethod
    def total(cls, setup: str, runs: list[Run]) -> Result:
        reasons: Counter[str] = Counter()
        for r in runs:
            reasons.update(r.reasons)
        return cls(
            setup,
            len(runs) if setup != "consolidated" else 0,
            np.sum([r.pods for r in runs], axis=0),
            sum(r.served for r in runs),
            sum(r.delayed for r in runs),
            sum(r.waited for r in runs),
            sum(r.arrived for r in runs),
            reasons,
        )

    @property
    def over_capacity(self) -> float:
        """Percent of requests that arrived beyond the ready capacity."""
        return 100 * self.delayed / max(self.arrived, 1)

    @property
    def mean_wait(self) -> float:
        """Seconds a request waited on average, all requests counted."""
        return self.waited / max(self.arrived, 1)

    def gpu_hours(self, tick: float) -> float:
        return float(self.pods.sum()) * tick / 3600

    def cost_per_million_tokens(self, args: argparse.Namespace) -> float:
        tokens = self.served * args.tokens_per_request
        return self.gpu_hours(args.tick) * args.gpu_hour_price / (tokens / 1e6)


def simulate_all(args: argparse.Namespace) -> tuple[dict[int, dict[str, Result]], dict]:
    top = max(args.sweep_counts)
    traffic = arrivals(args, top)
    jobs = [(setup, traffic[m], args) for setup in SETUPS[1:] for m in range(top)]
    jobs += [("consolidated", traffic[:n].sum(axis=0), args) for n in args.sweep_counts]
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            runs = list(pool.map(run_one, jobs, chunksize=4))
    else:
        runs = [run_one(job) for job in jobs]
    per_model = {s: runs[i * top : (i + 1) * top] for i, s in enumerate(SETUPS[1:])}
    consolidated = runs[len(SETUPS[1:]) * top :]
    results: dict[int, dict[str, Result]] = {}
    for i, n in enumerate(args.sweep_counts):
        results[n] = {"consolidated": Result.total("consolidated", [consolidated[i]])}
        for s in SETUPS[1:]:
            results[n][s] = Result.total(s, per_model[s][:n])
    series = {
        "traffic": traffic[: args.models],
        "ready": consolidated[args.sweep_counts.index(args.models)].ready,
    }
    return results, series


def table(results: dict[str, Result], args: argparse.Namespace) -> str:
    rows = [
        "| setup | GPU-hours | peak GPUs | mean GPUs | requests over capacity | mean wait | "
        f"USD per M tokens (at {args.gpu_hour_price:g}/GPU-h) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in SETUPS:
        r = results[s]
        rows.append(
            f"| {s} | {r.gpu_hours(args.tick):,.1f} | {int(r.pods.max())} | "
            f"{r.pods.mean():.1f} | {r.delayed:,.0f} ({r.over_capacity:.2f}%) | "
            f"{r.mean_wait:.1f} s | {r.cost_per_million_tokens(args):.3f} |"
        )
    return "\n".join(rows)


def sweep_table(results: dict[int, dict[str, Result]], args: argparse.Namespace) -> str:
    head = " | ".join(f"{s} USD/M tok | over cap." for s in SETUPS)
    rows = [f"| models | {head} |", "|---:|" + "---:|---:|" * len(SETUPS)]
    for n, by_setup in results.items():
        cells = []
        for s in SETUPS:
            r = by_setup[s]
            cells.append(f"{r.cost_per_million_tokens(args):.3f}")
            cells.append(f"{r.over_capacity:.2f}%")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: dict[int, dict[str, Result]], series: dict, args: argparse.Namespace) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    colors = {"consolidated": "tab:blue", "dedicated": "tab:red", "dedicated-zero": "tab:orange"}
    day = results[args.models]
    hours = (np.arange(len(day["consolidated"].pods)) + 1) * args.tick / 3600
    per_minute = max(1, round(60 / args.tick))

    def smooth(x: np.ndarray) -> np.ndarray:
        return np.convolve(x, np.ones(per_minute) / per_minute, mode="same")

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    traffic = series["traffic"] / args.tick
    top.plot(hours, smooth(traffic.sum(axis=0)), color="black", lw=1.2, label="all models")
    busiest = np.argsort(traffic.sum(axis=1))[::-1][:3]
    for m in busiest:
        top.plot(hours, smooth(traffic[m]), lw=0.8, label=f"model {m}")
    top.set_ylabel("requests / s (1-min mean)")
    top.set_title(f"{args.models} fine-tuned models, one simulated day (seed {args.seed})")
    top.legend(loc="upper left", fontsize=8, ncol=4)
    for s in SETUPS:
        r = day[s]
        label = f"{s}: {r.gpu_hours(args.tick):,.0f} GPU-h, peak {int(r.pods.max())}"
        bottom.step(hours, r.pods, where="post", color=colors[s], lw=1.1, label=label)
    bottom.plot(
        hours, series["ready"], color="tab:blue", lw=0.6, ls=":", label="consolidated: ready"
    )
    bottom.set_ylabel("GPUs (replicas)")
    bottom.set_xlabel("hour (UTC)")
    bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    day_png = args.out / "autoscale-day.png"
    fig.savefig(day_png, dpi=110)
    plt.close(fig)

    fig, (cost, over) = plt.subplots(1, 2, figsize=(11, 4.2))
    counts = list(results)
    for s in SETUPS:
        rs = [results[n][s] for n in counts]
        cost.plot(counts, [r.cost_per_million_tokens(args) for r in rs], "o-", color=colors[s])
        over.plot(counts, [r.over_capacity for r in rs], "o-", color=colors[s], label=s)
    cost.set_ylabel(f"USD per million tokens (GPU-hour at {args.gpu_hour_price:g} USD)")
    cost.set_title("cost per million tokens served")
    cost.set_ylim(bottom=0)
    over.set_ylabel("% of requests beyond the ready capacity")
    over.set_title("requests that had to wait (bursts, cold starts)")
    over.set_ylim(bottom=0)
    over.legend(fontsize=8)
    for ax in (cost, over):
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.minorticks_off()
        ax.set_xlabel("fine-tuned models of one base")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    cost_png = args.out / "autoscale-cost.png"
    fig.savefig(cost_png, dpi=110)
    plt.close(fig)
    return [day_png, cost_png]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    print(f"# bench/autoscale.py  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"# command: {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}")
    print(
        f"# {args.hours:g} h, tick {args.tick:g} s, seed {args.seed}; a GPU serves "
        f"{args.capacity_rps:g} req/s of one model ({args.tokens_per_request} tokens each), "
        f"x{args.multi_lora_efficiency:g} consolidated; target {args.target_utilization:g} of "
        f"capacity; startup {args.startup_seconds:g} s; scale to zero after {args.idle_seconds} s"
    )
    results, series = simulate_all(args)
    day = results[args.models]
    mean_rate = day["consolidated"].arrived / (args.hours * 3600)
    print(f"\n{args.models} models, {mean_rate:.2f} req/s on average:\n")
    print(table(day, args))
    print("\nsweep over the number of models:\n")
    print(sweep_table(results, args))
    reasons = ", ".join(f"{r} {n}" for r, n in day["consolidated"].reasons.most_common())
    print(f"\nconsolidated decisions by reason: {reasons}")
    if not args.no_plots:
        for png in plot(results, series, args):
            print(f"wrote {png}")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
