#!/usr/bin/env python3
"""10k mocker workers over one nats-server (issue 20, item 4); driven by scripts/bench-fleet.

Starts nats-server (JetStream, monitoring), a router component, a frontend that asks it for
routes, then PROCESSES `dynamo-run` worker processes hosting WORKERS mocker workers in all.
Measures: time until the router lists every worker; idle bus messages/s (nats-server's
/varz) and the CPU of every process over IDLE seconds; a `dynamo-run bench` run with the
router's event lag and routing time (its histograms, before and after) and the CPU it cost;
RSS per worker. Prints a markdown table with the issue's targets.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

RUN = sys.argv[1]
NATS = sys.argv[2]
OUT = os.path.abspath(sys.argv[3])
WORKERS = int(os.environ.get("WORKERS", "10000"))
PROCESSES = int(os.environ.get("PROCESSES", "8"))
IDLE = float(os.environ.get("IDLE_SECONDS", "20"))
# Seconds to wait after the idle window, before the bench (for a profiler: the pids are in $OUT/pids).
HOLD = float(os.environ.get("HOLD_SECONDS", "0"))
REQUESTS = int(os.environ.get("REQUESTS", "2000"))
CONCURRENCY = int(os.environ.get("CONCURRENCY", "32"))
BLOCKS = os.environ.get("BLOCKS", "1024")
SPEEDUP = os.environ.get("SPEEDUP", "1")
BASE = 20000 + os.getpid() % 20000
NATS_PORT, MON_PORT, HTTP_PORT, ROUTER_METRICS = BASE, BASE + 1, BASE + 2, BASE + 3
BUS = f"nats://127.0.0.1:{NATS_PORT}"
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

procs = {}  # label -> Popen


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def start(label, args, env=None):
    out = open(os.path.join(OUT, f"{label}.log"), "w")
    e = dict(os.environ, DYN_LOG="warn", **(env or {}))
    procs[label] = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=e)
    return procs[label]


def stop_all():
    for p in reversed(list(procs.values())):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + 30
    for p in procs.values():
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_log(label, word, seconds):
    path = os.path.join(OUT, f"{label}.log")
    deadline = time.time() + seconds
    while time.time() < deadline:
        if procs[label].poll() is not None:
            sys.exit(f"{label} exited ({procs[label].returncode}); see {path}")
        with open(path) as f:
            if word in f.read():
                return
        time.sleep(0.05)
    sys.exit(f"{label}: no {word!r} within {seconds} s; see {path}")


def metrics(port):
    """Prometheus text -> {(name, labels): value}."""
    out = {}
    for line in get(f"http://127.0.0.1:{port}/metrics").splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def hist(before, after, name):
    """The histogram's buckets observed between two scrapes: [(le, count)], total."""
    buckets = []
    for (n, labels), v in after.items():
        if n == name + "_bucket":
            le = re.search(r'le="([^"]+)"', labels).group(1)
            buckets.append((float(le), v - before.get((n, labels), 0.0)))
    buckets.sort()
    total = after.get((name + "_count", ""), 0.0) - before.get((name + "_count", ""), 0.0)
    return buckets, total


def quantile(buckets, total, q):
    """The bucket bound under which a q share of the observations fall (Prometheus style,
    linear within the bucket)."""
    if total <= 0:
        return None
    want, lo, below = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= want:
            inside = count - below
            return lo + (le - lo) * ((want - below) / inside if inside else 1.0)
        lo, below = le, count
    return float("inf")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def cpu_snapshot():
    return {k: cpu_ticks(p.pid) for k, p in procs.items() if p.poll() is None}


def cpu_cores(a, b, seconds):
    """Cores used per group (nats, router, frontend, workers) between two snapshots."""
    groups = {}
    for k in b:
        g = "workers" if k.startswith("workers") else k
        groups[g] = groups.get(g, 0.0) + (b[k] - a.get(k, 0)) / TICK / seconds
    return groups


def varz():
    v = json.loads(get(f"http://127.0.0.1:{MON_PORT}/varz"))
    return v["in_msgs"], v["out_msgs"], v["in_bytes"], v["out_bytes"]


def main():
    os.makedirs(OUT, exist_ok=True)
    model = os.path.join(OUT, "model")
    if not os.path.exists(os.path.join(model, "tokenizer.json")):
        subprocess.run([RUN, "make-model", "--out", model], check=True, stdout=subprocess.DEVNULL)
    store = os.path.join(OUT, "jetstream")
    subprocess.run(["rm", "-rf", store], check=True)
    start("nats", [NATS, "-a", "127.0.0.1", "-p", str(NATS_PORT), "-m", str(MON_PORT), "-js", "-sd", store])
    for _ in range(100):
        try:
            varz()
            break
        except OSError:
            time.sleep(0.05)
    start("router", [RUN, "router", "--bus", BUS, "--metrics-port", str(ROUTER_METRICS)])
    wait_log("router", "ready", 60)
    start("frontend", [RUN, "in=http", "out=dyn", "--bus", BUS, "--router-mode", "kv", "--remote-router",
                       "--model-name", "mock", "--http-host", "127.0.0.1", "--http-port", str(HTTP_PORT)])
    wait_log("frontend", "ready", 60)
    per = [WORKERS // PROCESSES + (1 if i < WORKERS % PROCESSES else 0) for i in range(PROCESSES)]
    log(f"starting {WORKERS} mocker workers in {PROCESSES} processes ({per[0]} each)")
    t0 = time.time()
    for i, n in enumerate(per):
        start(f"workers{i}", [RUN, "in=dyn://dynamo.backend.generate", "out=mocker", "--bus", BUS,
                              "--model-path", model, "--model-name", "mock", "--num-workers", str(n),
                              "--num-gpu-blocks", BLOCKS, "--block-size", "64", "--speedup-ratio", SPEEDUP])
    ready_at = {}
    listed_at, last_report = None, 0.0
    while listed_at is None:
        now = time.time()
        if now - t0 > 300:
            sys.exit("the router did not list every worker within 300 s")
        for i in range(PROCESSES):
            label = f"workers{i}"
            if label not in ready_at:
                if procs[label].poll() is not None:
                    sys.exit(f"{label} exited; see {OUT}/{label}.log")
                with open(os.path.join(OUT, f"{label}.log")) as f:
                    if "ready" in f.read():
                        ready_at[label] = now - t0
        listed = metrics(ROUTER_METRICS).get(("dynamo_router_workers", ""), 0.0)
        if listed >= WORKERS:
            listed_at = now - t0
        elif now - last_report > 5:
            log(f"  {now - t0:5.1f} s: {len(ready_at)} of {PROCESSES} processes ready, router lists {listed:.0f}")
            last_report = now
        time.sleep(0.1)
    log(f"all {WORKERS} listed after {listed_at:.1f} s (processes ready after {max(ready_at.values()):.1f} s)")

    # Idle: what the fleet costs while nothing is asked of it (after a lease of settling).
    time.sleep(6)
    log(f"idle for {IDLE:.0f} s")
    m0, c0, t_a = varz(), cpu_snapshot(), time.time()
    time.sleep(IDLE)
    m1, c1, t_b = varz(), cpu_snapshot(), time.time()
    idle_s = t_b - t_a
    idle = cpu_cores(c0, c1, idle_s)
    msgs_in, msgs_out = (m1[0] - m0[0]) / idle_s, (m1[1] - m0[1]) / idle_s
    bytes_in = (m1[2] - m0[2]) / idle_s

    with open(os.path.join(OUT, "pids"), "w") as f:
        f.writelines(f"{k} {p.pid}\n" for k, p in procs.items())
    time.sleep(HOLD)
    worker_rss = sum(rss(p.pid) for k, p in procs.items() if k.startswith("workers"))

    log(f"bench: {REQUESTS} requests at concurrency {CONCURRENCY}")
    r0, c0, t_a = metrics(ROUTER_METRICS), cpu_snapshot(), time.time()
    bench_json = os.path.join(OUT, "bench.json")
    subprocess.run([RUN, "bench", "--url", f"http://127.0.0.1:{HTTP_PORT}", "--model", "mock",
                    "--workload", "shared-prefix", "--requests", str(REQUESTS), "--concurrency", str(CONCURRENCY),
                    "--output-tokens", "64", "--block-size", "64", "--output-json", bench_json],
                   check=True, stdout=subprocess.DEVNULL, stderr=open(os.path.join(OUT, "bench.log"), "w"))
    r1, c1, t_b = metrics(ROUTER_METRICS), cpu_snapshot(), time.time()
    busy = cpu_cores(c0, c1, t_b - t_a)
    b = json.load(open(bench_json))
    errors = sum(b["errors"].values()) if isinstance(b["errors"], dict) else b["errors"]
    lag_b, lag_n = hist(r0, r1, "dynamo_router_event_lag_seconds")
    route_b, route_n = hist(r0, r1, "dynamo_router_routing_seconds")
    lag99, route99 = quantile(lag_b, lag_n, 0.99), quantile(route_b, route_n, 0.99)
    # The smallest bucket bound that holds every observation.
    lag_max_bucket = min((le for le, c in lag_b if c >= lag_n), default=0.0)
    router_rss, frontend_rss = rss(procs["router"].pid), rss(procs["frontend"].pid)
    stop_all()

    ms = lambda v: "-" if v is None else f"{1000 * v:.2f} ms"
    cores = lambda g: " + ".join(f"{k} {v:.2f}" for k, v in sorted(g.items()))
    print(f"| {WORKERS} mocker workers in {PROCESSES} processes, one nats-server, a router, a frontend | measured | target |")
    print("|---|---:|---|")
    print(f"| all listed by the router (from the processes' start) | {listed_at:.1f} s (processes ready {max(ready_at.values()):.1f} s) | < 60 s |")
    print(f"| idle bus messages/s (nats-server in / out) | {msgs_in:,.0f} / {msgs_out:,.0f} ({bytes_in / 1e6:.1f} MB/s in) | |")
    print(f"| idle CPU, whole fleet | {sum(idle.values()):.2f} cores ({cores(idle)}) | < 1 core |")
    print(f"| router event lag p99 under the bench ({lag_n:.0f} batches) | {ms(lag99)} (all below {ms(lag_max_bucket) if lag_max_bucket else '-'}) | < 10 ms |")
    print(f"| routing time p99 ({route_n:.0f} routes) | {ms(route99)} | < 1 ms |")
    print(f"| bench: {REQUESTS} requests, concurrency {CONCURRENCY}, shared prefix, 64 output tokens | "
          f"{b['requests_per_second']:.1f} req/s, TTFT p50 {b['ttft_ms']['p50']:.1f} ms p99 {b['ttft_ms']['p99']:.1f} ms, "
          f"{errors} errors; CPU {sum(busy.values()):.2f} cores ({cores(busy)}) | |")
    print(f"| RSS per worker (worker processes) | {worker_rss / WORKERS / 1024:.0f} KiB ({worker_rss / 2**30:.2f} GiB in all); router {router_rss / 2**20:.0f} MiB, frontend {frontend_rss / 2**20:.0f} MiB | |")


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
