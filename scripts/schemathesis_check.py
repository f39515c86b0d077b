#!/usr/bin/env python3
"""schemathesis against `vkv serve`: every operation of the served `/openapi.json`, with
`--checks all` (no 5xx, no schema-valid request refused, no schema-invalid one accepted, `Allow`
on 405, answers that match their schemas, ...), for a bounded number of examples per operation.

    python3 scripts/schemathesis_check.py --vkv target/debug/vkv [--max-examples 50] [-- serve options]

starts the server (on a free port, `--max-model-len 1024` unless given: generations stay short
on a debug build, and the prompts schemathesis writes stay well inside it), runs `schemathesis
run` (a response may take up to 120 s: a debug build generating up to a context of tokens for
several workers at once), and stops the server with SIGTERM. The seed is fixed so that a
failure in CI can be replayed. Needs `pip install schemathesis` in the same environment as the
Python running this; exits non-zero on any failure or error. About 16 minutes on 2 cores.
"""

import argparse
import os
import subprocess
import sys

from vkv_serve import served


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vkv", required=True, help="the vkv binary to serve with")
    p.add_argument("--max-examples", type=int, default=50, help="examples per operation")
    p.add_argument("--workers", type=int, default=4, help="concurrent schemathesis workers")
    p.add_argument("--seed", type=int, default=20261206)
    p.add_argument("serve_args", nargs="*", help="more `vkv serve` options (after --)")
    args = p.parse_args()
    serve_args = args.serve_args
    if not any(a.startswith("--max-model-len") for a in serve_args):
        serve_args = ["--max-model-len", "1024", *serve_args]
    # `n` is at most --max-num-seqs (the served schema says so): keep the choices of one
    # generated request few, so that a debug build answers it in time.
    if not any(a.startswith("--max-num-seqs") for a in serve_args):
        serve_args = ["--max-num-seqs", "4", *serve_args]
    st = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    # A line per request would bury schemathesis' report.
    os.environ.setdefault("RUST_LOG", "warn")
    with served(args.vkv, serve_args) as (base_url, _):
        run = subprocess.run([
            st, "run", f"{base_url}/openapi.json", "--checks", "all",
            "--max-examples", str(args.max_examples), "--workers", str(args.workers),
            "--seed", str(args.seed), "--request-timeout", "120", "--max-response-time", "120",
        ])
    if run.returncode != 0:
        sys.exit(f"schemathesis found failures (exit {run.returncode})")
    print("ok: schemathesis --checks all found nothing")


if __name__ == "__main__":
    main()
