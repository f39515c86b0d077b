#!/usr/bin/env python3
"""Issue 5's scaling measurement: one sequence against sixteen, for several builds, alternating.

Runs `BIN bench offline --workload W --num-prompts 1|16 --kv-mode paged --json` for every
`label=BIN[:extra args]` given, set after set (label after label within a set, one sequence then
sixteen), so that a noisy shared host disturbs every configuration alike; then prints, per
label, the medians of output tokens/s, the ratio of the medians, the per-set ratios and the
median TPOT and TTFT. One sequence's run is short, so it takes `--repeats` runs in one process
(their median). Raw lines go to `--out` as they come.

    python3 scripts/scaling_ab.py --sets 7 --out /tmp/ab.txt \\
        base=/tmp/vkv-base main=target/release/vkv "fp8=target/release/vkv:--kv-cache-dtype fp8"
"""

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time


def run(binary, extra, workload, n, repeats):
    cmd = [binary, "bench", "offline", "--workload", workload, "--num-prompts", str(n),
           "--repeats", str(repeats), "--kv-mode", "paged", "--json", *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    m = json.loads(out)["median"][0]
    return m["output_tokens_per_s"], m["tpot_ms"]["mean"], m["ttft_ms"]["mean"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="label=BINARY[:extra arguments]")
    p.add_argument("--sets", type=int, default=5)
    p.add_argument("--workload", default="fixed:128,128")
    p.add_argument("--repeats-one", type=int, default=3,
                   help="runs of the one-sequence case per set (their median)")
    p.add_argument("--out", help="append raw results here")
    args = p.parse_args()

    configs = []
    for c in args.configs:
        label, _, rest = c.partition("=")
        binary, _, extra = rest.partition(":")
        if not label or not binary:
            sys.exit(f"expected label=BINARY[:extra args], found {c!r}")
        configs.append((label, binary, shlex.split(extra)))

    results = {label: {1: [], 16: []} for label, _, _ in configs}
    for s in range(1, args.sets + 1):
        for label, binary, extra in configs:
            for n in (1, 16):
                tok, tpot, ttft = run(binary, extra, args.workload, n,
                                      args.repeats_one if n == 1 else 1)
                results[label][n].append((tok, tpot, ttft))
                line = (f"{time.strftime('%H:%M:%S', time.gmtime())} set={s} n={n} {label} "
                        f"{tok:.1f} {ttft:.0f} {tpot:.2f}")
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")

    print()
    for label, r in results.items():
        one = [t for t, _, _ in r[1]]
        many = [t for t, _, _ in r[16]]
        per_set = [b / a for a, b in zip(one, many)]
        m1, m16 = statistics.median(one), statistics.median(many)
        print(f"{label}: 1 seq {m1:.1f}, 16 seq {m16:.1f} output tok/s; "
              f"16/1 of medians {m16 / m1:.2f}; per set "
              f"{', '.join(f'{x:.2f}' for x in per_set)}; "
              f"TPOT 1/16 {statistics.median(t for _, t, _ in r[1]):.2f}/"
              f"{statistics.median(t for _, t, _ in r[16]):.2f} ms; "
              f"TTFT 16 {statistics.median(t for _, _, t in r[16]):.0f} ms")


if __name__ == "__main__":
    main()
