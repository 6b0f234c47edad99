"""Cluster hit rate on a Zipf trace, against one cache with the summed capacity and against plain LRU.

    .venv/bin/python bench/cluster_hit_rate.py                 # defaults: about 5 minutes on 2 cores
    .venv/bin/python bench/cluster_hit_rate.py --requests 5000 --models 150   # quicker

What it does, all on 127.0.0.1 with ports chosen by the kernel:
  1. writes N dense ONNX models of M MiB (examples/generate_models.py) under bench/out/, once;
  2. measures the size meshd charges per model (a probe meshd loads a few of them), and from it sets
     each pod's --capacity so that the pods together hold --fraction of the models;
  3. cluster run: a real etcd and --pods meshd pods sharing it; replays a deterministic Zipf trace
     (each request sent to the pod the trace names, drawn at random) with --clients tritonclient
     threads, checking every answer against ONNX Runtime in this process;
  4. single run: one meshd, no etcd, capacity = pods x capacity, replaying the identical trace;
  5. prints hit rate = 1 - model loads / requests for both (loads from each pod's /metrics), with
     forwards and evictions, beside two simulations over the same trace: one LRU of the summed
     capacity, and --pods separate LRUs each seeing only the requests sent to it (no forwarding).

Every meshd and etcd it starts is stopped by pid when it ends (also on error or Ctrl-C). Their logs are
kept in bench/out/cluster-hit-rate/logs/. Needs target/release/meshd and meshctl
(cargo build --release -p densemesh-mesh --bins) and the project's .venv (scripts/setup.sh test).

--write-trace FILE also writes the trace as CSV for `meshctl simulate` (each model at the size the probe
measured), and prints the simulate command with the pods' capacity; with --trace-only it writes just
that, sized by --charged-mib, and starts nothing (numpy is all it needs):

    .venv/bin/python bench/cluster_hit_rate.py --trace-only --write-trace bench/out/cluster-hit-rate.csv
"""
import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
sys.path.insert(0, str(REPO / "tests" / "e2e"))  # reuse the e2e tests' meshd and etcd launchers

HIDDEN = 256  # generate_models.py's default width: the models take x FP32 [-1, 256]


# ---------------------------------------------------------------- inputs: models, trace, expected answers


def ensure_models(count: int, mb: float) -> Path:
    """The model repository, generated once per (count, size): generation is deterministic, so a
    complete directory from an earlier run is the same bytes and is reused."""
    repo = OUT / f"cluster-hit-rate-models-{count}x{mb:g}MiB"
    stamp = repo / ".complete"
    if not stamp.exists():
        print(f"generating {count} dense models of {mb:g} MiB in {repo} ...", flush=True)
        shutil.rmtree(repo, ignore_errors=True)
        subprocess.run([sys.executable, str(REPO / "examples" / "generate_models.py"),
                        "--dense", str(repo), "--count", str(count), "--mb", str(mb)], check=True)
        stamp.touch()
    return repo


def model_ids(count: int) -> list[str]:
    """generate_models.py names its models dense-0 .. dense-(count-1); the repository registers them
    under their directory names."""
    return [f"dense-{i}" for i in range(count)]


def expected_outputs(repo: Path, ids: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """Each model's answer for `x` from ONNX Runtime in this process, so a request answered by the wrong
    model (a routing or forwarding bug) is caught, not counted as a hit. Kept next to the models (the
    input is fixed), since building hundreds of sessions takes seconds."""
    cached = repo / "expected.npz"
    if cached.exists():
        with np.load(cached) as saved:
            if set(saved.files) == {*ids, "x"} and np.array_equal(saved["x"], x):
                return {m: saved[m] for m in ids}
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    answers = {m: ort.InferenceSession(str(repo / m / "model.onnx"), options).run(None, {"x": x})[0] for m in ids}
    np.savez(cached, x=x, **answers)
    return answers


@dataclass
class Trace:
    """The requests in order: which model (by rank in popularity) and which pod each one is sent to.
    Generated from one seed, so every run and simulation sees exactly the same sequence."""

    models: np.ndarray  # model index per request; index 0 is the most popular
    pods: np.ndarray  # pod index per request, uniform at random


def zipf_trace(n_models: int, requests: int, exponent: float, pods: int, seed: int) -> Trace:
    """P(model k) proportional to 1 / (k+1)^exponent over a finite set of models (numpy's zipf is
    unbounded and needs exponent > 1; the classic web-cache exponent is about 1)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_models + 1) ** exponent
    models = rng.choice(n_models, size=requests, p=weights / weights.sum())
    return Trace(models=models, pods=rng.integers(0, pods, size=requests))


def write_trace(path: Path, trace: Trace, ids: list[str], size_bytes: int, rate: float) -> None:
    """The trace as `meshctl simulate` reads it: time_ms,model_id,size_bytes, one request a line. The
    replay has no clock of its own (closed-loop clients), so times are spread at `rate` requests/s; only
    their order matters to the simulated LRU."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        out.write(f"# bench/cluster_hit_rate.py trace: {len(trace.models)} requests; pods drawn by meshctl's --seed\n")
        out.write("time_ms,model_id,size_bytes\n")
        for n, m in enumerate(trace.models.tolist()):
            out.write(f"{int(n * 1000 / rate)},{ids[m]},{size_bytes}\n")


def pod_capacity(args, size: float) -> int:
    """Each pod's --capacity: room for its share of --fraction of the models, plus half a model, since
    each load is charged its own measured size, a few percent around the probe's mean, and a capacity of
    exactly k models would hold k or k-1 by chance."""
    return math.ceil((max(1, round(args.models * args.fraction / args.pods)) + 0.5) * size)


def simulate_command(args, path: Path, capacity: int) -> str:
    meshctl = args.bin_dir / "meshctl"
    return shlex.join([str(meshctl), "simulate", str(path), "--pods", str(args.pods), "--capacity", str(capacity),
                       "--eviction", "lru,gdsf"])


# ---------------------------------------------------------------- simulations


def lru_hits(sequence, slots: int) -> int:
    """Hits of an LRU cache holding `slots` equal-sized models, over `sequence` served one at a time."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for m in sequence:
        if m in cache:
            hits += 1
            cache.move_to_end(m)
        else:
            cache[m] = None
            if len(cache) > slots:
                cache.popitem(last=False)
    return hits


def simulate(trace: Trace, pods: int, per_pod_slots: int, summed_slots: int) -> dict[str, float]:
    """Hit rates of one LRU of `summed_slots` models, and of `pods` LRUs of `per_pod_slots` that never
    share (each sees only the requests sent to it): the first is what a perfect mesh would match, the
    second what pods that did not share would get."""
    n = len(trace.models)
    one = lru_hits(trace.models.tolist(), summed_slots) / n
    separate = sum(lru_hits(trace.models[trace.pods == p].tolist(), per_pod_slots) for p in range(pods)) / n
    return {"lru_summed": one, "lru_separate": separate}


# ---------------------------------------------------------------- meshd and its metrics


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text to {(name, frozenset of (label, value)): value}."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name, _, labels = key.partition("{")
        pairs = frozenset(tuple(p.split("=", 1)) for p in labels.rstrip("}").split(",") if p) if labels else frozenset()
        values[(name, frozenset((k, v.strip('"')) for k, v in pairs))] = float(value)
    return values


def scrape(pod) -> dict:
    with urllib.request.urlopen(f"http://{pod.metrics_addr}/metrics", timeout=10) as r:
        return parse_metrics(r.read().decode())


def metric(scrapes: list[dict], name: str, **labels) -> float:
    """`name` summed over pods and over every label set that includes `labels`."""
    want = set(labels.items())
    return sum(v for s in scrapes for (n, ls), v in s.items() if n == name and want <= ls)


def delta(before: list[dict], after: list[dict], name: str, **labels) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def binaries(bin_dir: Path) -> None:
    """meshd for the e2e launcher (it reads MESHD_BIN) and meshctl for wait_peers."""
    for name in ("meshd", "meshctl"):
        if not (bin_dir / name).exists():
            sys.exit(f"{bin_dir / name} is missing: cargo build --release -p densemesh-mesh --bins")
    os.environ["MESHD_BIN"] = str(bin_dir / "meshd")


def point_at_onnxruntime() -> None:
    """meshd finds libonnxruntime.so through ORT_DYLIB_PATH; point it at this interpreter's package
    (what scripts/env.sh does), so the script runs from any directory."""
    if os.environ.get("ORT_DYLIB_PATH"):
        return
    import onnxruntime

    libs = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so*"))
    if libs:
        os.environ["ORT_DYLIB_PATH"] = str(libs[-1])


class Pods:
    """The meshd processes of one run; `close()` keeps their logs and stops each by its own pid."""

    def __init__(self, run: str):
        self.run = run
        self.pods = []

    def start(self, repo: Path, *args: str):
        from meshd import Meshd

        pod = Meshd(repo, *args)
        self.pods.append(pod)
        return pod

    def close(self) -> None:
        logs = OUT / "cluster-hit-rate" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for old in logs.glob(f"{self.run}-*.log"):  # an earlier run's, perhaps with more pods
            old.unlink()
        for i, pod in enumerate(self.pods):
            try:
                pod.log.flush()
                shutil.copy(pod.log_path, logs / f"{self.run}-{i}.log")
            except OSError:
                pass
            pod.stop()
        self.pods = []


def log_problems(run: str) -> list[str]:
    """WARN and ERROR lines from a run's kept logs: a hit-rate figure is only meaningful if nothing
    went wrong underneath."""
    lines = []
    for path in sorted((OUT / "cluster-hit-rate" / "logs").glob(f"{run}-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if " WARN " in line or " ERROR " in line or "panicked" in line:
                lines.append(f"{path.name}: {line.strip()}")
    return lines


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)
    return value


def wait_registered(pods: list, count: int) -> None:
    """Every pod registers the repository's models at start (in etcd, all pods the same ones); the
    trace starts once every pod's view holds all of them, so no request meets NOT_FOUND."""
    wait_until(lambda: all(metric([scrape(p)], "densemesh_models_managed") >= count for p in pods), 120,
               f"every pod to see {count} models")


def wait_peers(pods: list) -> None:
    """Forwarding needs each pod to see the others' instance records; until then a pod loads locally."""
    meshctl = Path(os.environ["MESHD_BIN"]).with_name("meshctl")

    def seen(pod) -> int:
        out = subprocess.run([str(meshctl), "--addr", pod.grpc_addr, "--output", "json", "instances"],
                             capture_output=True, text=True)
        return len(json.loads(out.stdout)) if out.returncode == 0 else 0

    wait_until(lambda: all(seen(p) >= len(pods) for p in pods), 60, "every pod to see every other pod")


def measure_model_size(repo: Path, ids: list[str], probes: int) -> float:
    """The bytes meshd charges one of these models, to size --capacity in models. meshd charges the
    process's memory growth while ONNX Runtime builds the session, never less than the file: a fresh
    process grows with every load, one that has evicted reuses freed memory and is charged less. So
    the probe measures in the runs' conditions: a meshd with room for about four models loads 3 x
    `probes` of them in turn (evicting), and the mean of the last `probes` loads is the answer."""
    import tritonclient.grpc as v2

    file_size = (repo / ids[-1] / "model.onnx").stat().st_size
    pods = Pods("probe")
    try:
        # The probe evicts on purpose, one load after another: meshd's anti-churn rule (10m by
        # default) would refuse every load once it is full.
        pod = pods.start(repo, "--capacity", str(int(4.5 * file_size)), "--instance-id", "probe",
                         "--anti-churn-age", "0s")
        wait_registered([pod], len(ids))
        client = v2.InferenceServerClient(pod.grpc_addr)
        inputs = [infer_input(np.zeros((1, HIDDEN), np.float32))]
        probed = ids[-3 * probes:]  # the least popular ones: the trace barely touches them
        for m in probed[:-probes]:
            client.infer(m, inputs)
        before = [scrape(pod)]
        for m in probed[-probes:]:
            client.infer(m, inputs)
        after = [scrape(pod)]
        client.close()
        return (delta(before, after, "densemesh_loaded_model_size_bytes_sum")
                / delta(before, after, "densemesh_loaded_model_size_bytes_count"))
    finally:
        pods.close()


# ---------------------------------------------------------------- replaying the trace


def infer_input(x: np.ndarray):
    import tritonclient.grpc as v2

    tensor = v2.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


@dataclass
class Replay:
    ok: int = 0
    wrong: list = field(default_factory=list)  # (model, pod) answered with another model's output
    failed: Counter = field(default_factory=Counter)  # gRPC code -> count
    first_errors: list = field(default_factory=list)
    seconds: float = 0.0


def replay(trace: Trace, ids: list[str], addrs: list[str], clients: int, x: np.ndarray,
           expected: dict[str, np.ndarray]) -> Replay:
    """Sends the trace in order from `clients` threads, each taking the next request when its last one
    is answered (closed loop), so the pods see the trace's order up to `clients` requests in flight.
    A failed request is counted and never retried: with room for every model it should not happen."""
    import tritonclient.grpc as v2
    from tritonclient.utils import InferenceServerException

    result = Replay()
    lock = threading.Lock()
    next_request = iter(range(len(trace.models)))

    def client() -> None:
        conns = [v2.InferenceServerClient(a) for a in addrs]
        inputs = [infer_input(x)]
        while True:
            with lock:
                n = next(next_request, None)
            if n is None:
                break
            model, pod = ids[trace.models[n]], int(trace.pods[n]) % len(addrs)
            try:
                y = conns[pod].infer(model, inputs, client_timeout=120).as_numpy("y")
                good = np.allclose(y, expected[model], rtol=1e-4, atol=1e-5)
                with lock:
                    result.ok += int(good)
                    if not good:
                        result.wrong.append((model, pod))
            except InferenceServerException as e:
                with lock:
                    result.failed[e.status() or "?"] += 1
                    if len(result.first_errors) < 5:
                        result.first_errors.append(f"request {n} ({model} to pod {pod}): {e.status()} {e.message()}")
        for c in conns:
            c.close()

    started = time.monotonic()
    # Daemon threads: on Ctrl-C the main thread stops the pods and exits without waiting for them.
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - started
    return result


@dataclass
class Slots:
    per_pod: int  # one pod's capacity / the cluster run's mean charged size
    summed: int  # pods x capacity / the single run's mean charged size


@dataclass
class RunFigures:
    name: str
    pods: int
    capacity_bytes: int
    requests: int
    replay: Replay
    loads: float
    load_failures: float
    evictions: float
    forwarded: dict
    copies_held: float
    mean_size: float
    problems: list

    @property
    def hit_rate(self) -> float:
        return 1 - self.loads / self.requests


def measure_run(name: str, pods: list, trace: Trace, ids, clients, x, expected, capacity: int) -> RunFigures:
    """Replays the trace against `pods` and reads what it cost from their metrics (after minus before,
    so anything done while starting is not charged to the trace)."""
    before = [scrape(p) for p in pods]
    result = replay(trace, ids, [p.grpc_addr for p in pods], clients, x, expected)
    after = [scrape(p) for p in pods]
    loads = delta(before, after, "densemesh_model_loads_total", result="success")
    sizes = delta(before, after, "densemesh_loaded_model_size_bytes_sum")
    counted = delta(before, after, "densemesh_loaded_model_size_bytes_count")
    forwarded = by_label(before, after, "densemesh_forwarded_requests_total", "result")
    return RunFigures(
        name=name, pods=len(pods), capacity_bytes=capacity, requests=len(trace.models), replay=result,
        loads=loads, load_failures=delta(before, after, "densemesh_model_loads_total", result="failure"),
        evictions=delta(before, after, "densemesh_cache_evictions_total"), forwarded=forwarded,
        copies_held=metric(after, "densemesh_models_loaded"), mean_size=sizes / counted if counted else 0.0,
        problems=[])


def by_label(before: list[dict], after: list[dict], name: str, label: str) -> dict[str, float]:
    """A counter's increase summed over pods, split by the values of one label."""
    values = {dict(ls)[label] for s in after for (n, ls) in s if n == name and label in dict(ls)}
    return {v: delta(before, after, name, **{label: v}) for v in sorted(values)}


def cluster_run(repo, ids, trace, args, capacity, x, expected) -> RunFigures:
    """--pods meshd pods on one fresh etcd, the copy and lease settings left at their defaults."""
    from test_etcd import Etcd

    etcd = Etcd()
    pods = Pods("cluster")
    try:
        common = ["--etcd", etcd.endpoint, "--capacity", str(capacity), "--shutdown-grace", "2s"]
        started = [pods.start(repo, *common, "--instance-id", f"pod-{i}", *args.meshd_arg) for i in range(args.pods)]
        wait_registered(started, len(ids))
        wait_peers(started)
        figures = measure_run("cluster", started, trace, ids, args.clients, x, expected, capacity)
    finally:
        pods.close()
        etcd.stop()
        etcd.dir.cleanup()
    figures.problems = log_problems("cluster")
    return figures


def single_run(repo, ids, trace, args, capacity, x, expected) -> RunFigures:
    """One meshd on its embedded store with the pods' summed capacity: the hit rate the cluster would
    have if it were one cache."""
    pods = Pods("single")
    try:
        pod = pods.start(repo, "--capacity", str(capacity), "--instance-id", "single", *args.meshd_arg)
        wait_registered([pod], len(ids))
        figures = measure_run("single", [pod], trace, ids, args.clients, x, expected, capacity)
    finally:
        pods.close()
    figures.problems = log_problems("single")
    return figures


# ---------------------------------------------------------------- report


def print_report(command: str, args, size: float, slots: Slots, capacity: int, runs, sims) -> None:
    """The table, then what a reader needs to trust it: sizes, errors, meshd's WARN/ERROR lines, and
    one JSON line (as bench/run.sh's steps print) for collecting results."""
    mib = 1 << 20
    print()
    print(f"command: {command}")
    print(f"trace: {args.requests} requests, Zipf exponent {args.exponent:g} over {args.models} models "
          f"(seed {args.seed}), each sent to one of {args.pods} pods at random, {args.clients} clients")
    print(f"models: {args.mb:g} MiB of weights, {size / mib:.3f} MiB charged per load (probe); capacity "
          f"{capacity / mib:.2f} MiB per pod, about {slots.per_pod} models; {args.pods} pods about "
          f"{args.pods * slots.per_pod} of {args.models} ({args.pods * slots.per_pod / args.models:.0%})")
    print()
    header = (f"{'':<42} {'hit rate':>8} {'loads':>6} {'evicted':>7} {'forwarded':>9} {'held':>4} "
              f"{'req/s':>6} {'failed':>6} {'wrong':>5}")
    print(header)
    print("-" * len(header))
    for r in runs:
        label = (f"cluster: {r.pods} meshd x {r.capacity_bytes / mib:.1f} MiB on etcd" if r.name == "cluster"
                 else f"single: 1 meshd x {r.capacity_bytes / mib:.1f} MiB")
        print(f"{label:<42} {r.hit_rate:>8.1%} {r.loads:>6.0f} {r.evictions:>7.0f} "
              f"{sum(r.forwarded.values()):>9.0f} {r.copies_held:>4.0f} {r.replay.ok / r.replay.seconds:>6.0f} "
              f"{sum(r.replay.failed.values()):>6} {len(r.replay.wrong):>5}")
    print(f"{f'sim: 1 LRU of {slots.summed} models':<42} {sims['lru_summed']:>8.1%}")
    print(f"{f'sim: {args.pods} LRUs of {slots.per_pod}, no sharing':<42} {sims['lru_separate']:>8.1%}")
    print()
    print("hit rate: 1 - successful model loads / requests, loads summed over the pods' /metrics (copies "
          "added for load count as loads)")
    print("held: models loaded at the end, summed over pods (a model held twice counts twice); "
          "sim slots: capacity / the run's mean charged size")
    for r in runs:
        fwd = ", ".join(f"{k} {v:.0f}" for k, v in r.forwarded.items()) or "none"
        print(f"{r.name}: {r.replay.seconds:.1f} s, mean charged size {r.mean_size / mib:.3f} MiB, "
              f"load failures {r.load_failures:.0f}, forwarded by result: {fwd}")
        if r.replay.failed:
            print(f"  failed requests by code: {dict(r.replay.failed)}")
        for e in r.replay.first_errors:
            print(f"  error: {e}")
        for w in r.replay.wrong[:5]:
            print(f"  wrong answer: {w[0]} sent to pod {w[1]}")
        for line in r.problems[:10]:
            print(f"  log: {line}")
        if len(r.problems) > 10:
            print(f"  log: ... {len(r.problems) - 10} more WARN/ERROR lines in bench/out/cluster-hit-rate/logs/")
    figures = {**{f"{r.name}_hit_rate": round(r.hit_rate, 4) for r in runs},
               **{k: round(v, 4) for k, v in sims.items()},
               **{f"{r.name}_failed": sum(r.replay.failed.values()) for r in runs},
               **{f"{r.name}_wrong": len(r.replay.wrong) for r in runs}}
    print(json.dumps({"run": {"kind": "cluster-hit-rate", "command": command}, "figures": figures}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=300, help="dense models in the repository")
    parser.add_argument("--mb", type=float, default=2.0, help="weights per model, MiB")
    parser.add_argument("--fraction", type=float, default=1 / 3, help="share of the models the pods hold together")
    parser.add_argument("--pods", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--exponent", type=float, default=1.0, help="Zipf exponent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--probes", type=int, default=8, help="loads averaged to measure a model's charged size")
    parser.add_argument("--meshd-arg", action="append", default=[],
                        help="extra meshd flag for both runs, e.g. --meshd-arg=--copy-add-rate=0 (repeatable)")
    parser.add_argument("--bin-dir", type=Path, default=REPO / "target" / "release",
                        help="where meshd and meshctl are (default target/release)")
    parser.add_argument("--skip-single", action="store_true", help="cluster run only")
    parser.add_argument("--write-trace", type=Path,
                        help="also write the trace as CSV for meshctl simulate (sized by the probe)")
    parser.add_argument("--trace-only", action="store_true",
                        help="write --write-trace (sized by --charged-mib) and the capacity, and stop")
    parser.add_argument("--charged-mib", type=float, default=2.063,
                        help="with --trace-only: MiB meshd charges per model (the probe's figure for 2 MiB models)")
    parser.add_argument("--trace-rate", type=float, default=142.0,
                        help="requests/s the written trace's times assume (the README run's req/s)")
    args = parser.parse_args()
    command = shlex.join([sys.executable, *sys.argv])
    if args.trace_only and not args.write_trace:
        parser.error("--trace-only needs --write-trace FILE")

    if args.trace_only:
        trace = zipf_trace(args.models, args.requests, args.exponent, args.pods, args.seed)
        size = args.charged_mib * (1 << 20)
        capacity = pod_capacity(args, size)
        write_trace(args.write_trace, trace, model_ids(args.models), round(size), args.trace_rate)
        print(f"wrote {args.requests} requests to {args.write_trace}; replay with:")
        print(simulate_command(args, args.write_trace, capacity))
        return

    binaries(args.bin_dir)
    point_at_onnxruntime()
    repo = ensure_models(args.models, args.mb)
    ids = model_ids(args.models)
    x = np.random.default_rng(0).normal(size=(1, HIDDEN)).astype(np.float32)
    expected = expected_outputs(repo, ids, x)
    trace = zipf_trace(args.models, args.requests, args.exponent, args.pods, args.seed)

    size = measure_model_size(repo, ids, args.probes)
    capacity = pod_capacity(args, size)
    if args.write_trace:
        write_trace(args.write_trace, trace, ids, round(size), args.trace_rate)
        print(f"trace written to {args.write_trace}; simulate it with: {simulate_command(args, args.write_trace, capacity)}")

    runs = [cluster_run(repo, ids, trace, args, capacity, x, expected)]
    if not args.skip_single:
        runs.append(single_run(repo, ids, trace, args, args.pods * capacity, x, expected))
    # Each load is charged its own measured size, so how many models a capacity holds drifts a little
    # from the probe's estimate; the simulations get the slots each run actually had on average.
    slots = Slots(per_pod=int(capacity // runs[0].mean_size),
                  summed=int(args.pods * capacity // runs[-1].mean_size))
    sims = simulate(trace, args.pods, slots.per_pod, slots.summed)
    print_report(command, args, size, slots, capacity, runs, sims)


if __name__ == "__main__":
    main()
