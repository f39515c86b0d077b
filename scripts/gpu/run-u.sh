#!/usr/bin/env bash
# Device call U (issue 20: `vkv plan` simulated against measured on the H100), one call within
# LIMIT seconds, after copying this file into .gpu/:
#   bash .gpu/run-u.sh LIMIT   the profile through the engine (at most 240 s), then vkv serve at
#                              10, 20, 30 and 40 sharegpt requests/s (45 s of arrivals each),
#                              then the simulation of each rate from the profile (prelude.sh's
#                              plan_check_runs). Needs LIMIT ≥ 560.
# Everything comes back packed in results.tgz (see prelude.sh).
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
plan_check_runs "10 20 30 40"
