#!/usr/bin/env python3
"""docs/plan.md's tables from the searches scripts/plan_placements.sh wrote: for each model,
GPU count and workload, the best placement, the best colocated and the best disaggregated one,
with per-GPU goodput and their P90s at that rate.

Usage: scripts/plan_tables.py [--summary] [DIR]   (default docs/plan; --summary: the one
table of every search's recommended, best colocated and best disaggregated placement)
"""

import json
import sys
from pathlib import Path

WORKLOADS = [("sharegpt", "chatbot"), ("humaneval", "code"), ("arxiv-summarization", "summarization")]


def name(p):
    pl = p["placement"]
    short = lambda prof: prof.split("-h100-")[-1] if "-h100-" in prof else "tp1"
    if "colocated" in pl:
        return f"{pl['colocated']['replicas']} × colocated {short(p['prefill_profile'])}"
    d = pl["disaggregated"]
    where = ", KV over network" if p.get("handoff") == "network" else ""
    return (f"{d['prefill']}P {short(p['prefill_profile'])} + "
            f"{d['decode']}D {short(p['decode_profile'])}{where}")


def row(label, p):
    if p is None:
        return f"| {label} | — | | | | |"
    return (f"| {label} | {name(p)} ({p['gpus']} GPUs) | {p['rate']:.1f} | "
            f"{p['goodput_per_gpu']:.2f} | {p['p90_ttft'] * 1e3:.0f} | {p['p90_tpot'] * 1e3:.1f} |")


def searches(d):
    """(model, gpus, app, workload, placements, slo) of every search in `d`, in page order."""
    for model in ["llama-3-8b", "llama-3-70b"]:
        for gpus in [8, 32]:
            for workload, app in WORKLOADS:
                f = d / f"{model}-{gpus}gpu-{workload}.json"
                if not f.exists() or f.stat().st_size == 0:
                    continue
                r = json.loads(f.read_text())
                yield model, gpus, app, workload, r["placements"], r["slo"]


def best_of_each(ps):
    """The best colocated and the best disaggregated placement (None where there is none), and
    the second's per-GPU goodput over the first's (None where it cannot be had)."""
    colo = next((p for p in ps if "colocated" in p["placement"]), None)
    dis = next((p for p in ps if "disaggregated" in p["placement"]), None)
    ratio = (dis["goodput_per_gpu"] / colo["goodput_per_gpu"]
             if colo and dis and colo["goodput_per_gpu"] > 0 else None)
    return colo, dis, ratio


def summary(d):
    print("| model | GPUs | workload | recommended placement | req/s per GPU | best colocated, "
          "req/s per GPU | best disaggregated, req/s per GPU | disaggregated / colocated |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for model, gpus, app, _, ps, _ in searches(d):
        colo, dis, ratio = best_of_each(ps)
        cell = lambda p: f"{p['goodput_per_gpu']:.2f} ({name(p)})" if p else "—"
        ratio = f"{ratio:.2f}" if ratio is not None else "—"
        print(f"| {model} | {gpus} | {app} | {name(ps[0])} | {ps[0]['goodput_per_gpu']:.2f} | "
              f"{cell(colo)} | {cell(dis)} | {ratio} |")


def details(d):
    for model, gpus, app, workload, ps, slo in searches(d):
        print(f"**{model}, {gpus} H100s, {app}** ({workload}; P90 TTFT ≤ {slo['ttft'] * 1e3:.0f} ms, "
              f"P90 TPOT ≤ {slo['tpot'] * 1e3:.0f} ms, {slo['attainment'] * 100:.0f} % of requests; "
              f"`{(d / f'{model}-{gpus}gpu-{workload}.cmd').read_text().strip()}`)")
        print()
        print("| | placement | req/s | req/s per GPU | P90 TTFT ms | P90 TPOT ms |")
        print("|---|---|---:|---:|---:|---:|")
        colo, dis, ratio = best_of_each(ps)
        print(row("best", ps[0] if ps else None))
        print(row("best colocated", colo))
        print(row("best disaggregated", dis))
        if ratio is not None:
            print(f"\nDisaggregated / colocated per-GPU goodput: {ratio:.2f}.")
        print()


def main():
    args = sys.argv[1:]
    if args and args[0] == "--summary":
        summary(Path(args[1] if len(args) > 1 else "docs/plan"))
    else:
        details(Path(args[0] if args else "docs/plan"))


if __name__ == "__main__":
    main()
