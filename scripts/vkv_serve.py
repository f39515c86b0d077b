"""Start `vkv serve` for a script and stop it: `served` is shared by openai_client.py,
schemathesis_check.py and soak.py, and `parse_with_server` by the scripts that take either a
running server or a binary to start (standard library only)."""

import contextlib
import signal
import subprocess
import sys


def parse_with_server(p):
    """Parse the command line of `p` with `--url` (a running server) or `--vkv` (a binary to
    start) and more `vkv serve` options after `--`; exactly one of the two must be given."""
    p.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--vkv", help="start this vkv binary (serve --port 0) and stop it at the end")
    p.add_argument("serve_args", nargs="*", help="more `vkv serve` options (after --)")
    args = p.parse_args()
    if bool(args.url) == bool(args.vkv):
        p.error("give --url or --vkv")
    return args


@contextlib.contextmanager
def served(vkv, serve_args, command="serve"):
    """Start `vkv serve --port 0 SERVE_ARGS` (or another serving command: `route`), yield its
    base URL and process, then stop it with SIGTERM; exits non-zero if it does not start or does
    not exit 0."""
    server = subprocess.Popen([vkv, command, "--port", "0", *serve_args],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        print(line.strip(), flush=True)
        if "http://" not in line:
            sys.exit(f"vkv {command} did not start: {line!r}")
        url = line.split("http://", 1)[1].split()[0]
        yield f"http://{url}", server
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    if code != 0:
        sys.exit(f"vkv {command} exited {code} on SIGTERM")
    print(f"ok: vkv {command} exits 0 on SIGTERM")
