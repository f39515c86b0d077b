#!/usr/bin/env python3
"""A soak of `vkv serve`: mixed streaming and whole completions and chat completions, some
aborted mid-way, from concurrent clients for a fixed time, with the server's resident memory
(RSS) and KV state sampled from /metrics and /proc as it goes. At the end the load stops, the
server must drain to nothing running, and its KV must be empty: `vkv_kv_allocated_bytes` and
`vkv_kv_sequences` 0 — every block (paged) or page (vmm) back in its pool (vmm pages may stay
cached in released slots, reclaimable; they hold no token).

    python3 scripts/soak.py --vkv target/release/vkv --minutes 30 [--json out.json] [-- serve options]
    python3 scripts/soak.py --url http://127.0.0.1:8000 --minutes 5   # RSS then unknown

Standard library only (it runs on the GPU machine too). Prints one line per sample and a JSON
summary; exits non-zero on any 5xx, a request that errs without being aborted, or KV left
behind. "Flat" is judged by the reader from the samples: RSS and KV after warm-up (the first
tenth of the run) against the end.
"""

import argparse
import http.client
import json
import random
import socket
import threading
import time
import urllib.parse

from vkv_serve import parse_with_server, served

TOPICS = ["the history of Paris", "how bees make honey", "why the sky is blue",
          "a recipe for bread", "the rules of chess", "how a compiler works",
          "the water cycle", "a short poem about autumn"]


class Counts:
    def __init__(self):
        self.lock = threading.Lock()
        self.by = {}

    def add(self, key):
        with self.lock:
            self.by[key] = self.by.get(key, 0) + 1

    def snapshot(self):
        with self.lock:
            return dict(self.by)


def one_request(host, port, rng, counts):
    """One request: completion or chat, whole or streamed, aborted or read to the end."""
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    abort = rng.random() < 0.25
    text = f"Write about {rng.choice(TOPICS)}." + " Give one example." * rng.randrange(0, 20)
    body = {"max_tokens": rng.randrange(1, 200), "temperature": rng.choice([0, 0.7, 1.0]),
            "stream": stream}
    if chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": text}]
    else:
        path = "/v1/completions"
        body["prompt"] = text
    # A whole request is aborted by closing the connection before the answer.
    timeout = rng.uniform(0.05, 1.0) if abort and not stream else 300
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    kind = f"{'chat' if chat else 'completion'}-{'stream' if stream else 'whole'}"
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status >= 500:
            counts.add(f"{kind}-{r.status}")
            return
        if r.status != 200:
            counts.add(f"{kind}-{r.status}")
            r.read()
            return
        if stream:
            keep = rng.randrange(1, 8) if abort else None
            lines = 0
            while True:
                line = r.fp.readline()
                if not line:
                    break
                if line.startswith(b"data:"):
                    lines += 1
                    if keep is not None and lines >= keep:
                        counts.add(f"{kind}-aborted")
                        return
                    if line.strip() == b"data: [DONE]":
                        break
            counts.add(f"{kind}-done")
        else:
            json.loads(r.read())
            counts.add(f"{kind}-done")
    except (socket.timeout, TimeoutError):
        counts.add(f"{kind}-aborted" if abort else f"{kind}-timeout")
    except (ConnectionError, http.client.HTTPException) as e:
        counts.add(f"{kind}-error-{type(e).__name__}")
    finally:
        conn.close()


def metrics(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def rss_kib(pid):
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def sample(host, port, pid, start):
    m = metrics(host, port)
    return {"t_s": round(time.time() - start, 1), "rss_kib": rss_kib(pid),
            "running": m.get("vkv_num_requests_running"),
            "waiting": m.get("vkv_num_requests_waiting"),
            "kv_allocated_bytes": m.get("vkv_kv_allocated_bytes"),
            "kv_sequences": m.get("vkv_kv_sequences"),
            "preemptions": m.get("vkv_num_preemptions_total"),
            "failures": m.get("vkv_request_failure_total"),
            "mapper_restarts": m.get("vkv_mapper_restarts_total")}


def soak(base_url, pid, minutes, clients, every_s, seed):
    u = urllib.parse.urlparse(base_url)
    host, port = u.hostname, u.port
    counts = Counts()
    stop = threading.Event()

    def client(i):
        rng = random.Random(seed * 1000 + i)
        while not stop.is_set():
            one_request(host, port, rng, counts)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    start = time.time()
    for t in threads:
        t.start()
    samples = []
    while time.time() - start < minutes * 60:
        time.sleep(min(every_s, max(0.0, minutes * 60 - (time.time() - start))))
        s = sample(host, port, pid, start)
        samples.append(s)
        print(json.dumps(s), flush=True)
    stop.set()
    for t in threads:
        t.join(timeout=330)
    # Drain: nothing running or waiting, then the final state.
    deadline = time.time() + 120
    while time.time() < deadline:
        end = sample(host, port, pid, start)
        if end["running"] == 0 and end["waiting"] == 0:
            break
        time.sleep(0.5)
    warm = [s for s in samples if s["t_s"] >= minutes * 6]
    first = warm[0] if warm else samples[0]
    summary = {"minutes": minutes, "clients": clients, "requests": counts.snapshot(),
               "rss_kib_after_warmup": first["rss_kib"],
               "rss_kib_end_of_load": samples[-1]["rss_kib"],
               "rss_kib_max_after_warmup": max((s["rss_kib"] or 0) for s in warm or samples),
               "kv_allocated_bytes_max": max(s["kv_allocated_bytes"] or 0 for s in samples),
               "drained": end, "samples": samples}
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--every", type=float, default=30, help="seconds between samples")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the summary here")
    args = parse_with_server(p)
    if args.url:
        summary = soak(args.url, None, args.minutes, args.clients, args.every, args.seed)
    else:
        with served(args.vkv, args.serve_args) as (url, server):
            summary = soak(url, server.pid, args.minutes, args.clients, args.every, args.seed)
    text = json.dumps(summary, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    bad = {k: n for k, n in summary["requests"].items()
           if k.split("-")[2] not in ("done", "aborted")}
    end = summary["drained"]
    problems = []
    if bad:
        problems.append(f"requests that neither finished nor were aborted: {bad}")
    if end["running"] or end["waiting"]:
        problems.append(f"not drained: {end}")
    if end["kv_allocated_bytes"] or end["kv_sequences"]:
        problems.append(f"KV left behind: {end}")
    if problems:
        raise SystemExit("; ".join(problems))
    print("ok: every request finished or was aborted, and the KV cache is empty")


if __name__ == "__main__":
    main()
