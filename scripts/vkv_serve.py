"""Start `vkv serve` for a script and stop it: [`served`] is shared by openai_client.py,
schemathesis_check.py and soak.py (standard library only)."""

import contextlib
import signal
import subprocess
import sys


@contextlib.contextmanager
def served(vkv, serve_args):
    """Start `vkv serve --port 0 SERVE_ARGS`, yield its base URL and process, then stop it with
    SIGTERM; exits non-zero if it does not start or does not exit 0."""
    server = subprocess.Popen([vkv, "serve", "--port", "0", *serve_args],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        print(line.strip(), flush=True)
        if "http://" not in line:
            sys.exit(f"vkv serve did not start: {line!r}")
        url = line.split("http://", 1)[1].split()[0]
        yield f"http://{url}", server
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    if code != 0:
        sys.exit(f"vkv serve exited {code} on SIGTERM")
    print("ok: vkv serve exits 0 on SIGTERM")
