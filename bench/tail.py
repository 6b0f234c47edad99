"""meshd's latency tail against the echo floor: the same closed-loop load on meshd and on a bare tonic
server that answers without working, in interleaved rounds of one run (issue 14, "a tighter tail").

    python3 bench/tail.py                                  # release build: 5 rounds x 10 s each, c=16
    python3 bench/tail.py --rounds 3 --duration 5s         # a quicker look
    python3 bench/tail.py --candidate /tmp/b/meshd         # A/B: another meshd build in the same rounds

Builds nothing: it takes the binaries (`cargo build --release -p densemesh-mesh --bins` first; by default
from target/release, or $CARGO_TARGET_DIR/release). It starts
meshd on examples/models (embedded store, ports chosen by the kernel), then `densemesh-bench echo-server`,
which copies meshd's ModelMetadata and ModelInfer answers for --model once and then answers every call
with that copy: same output names, shapes, datatypes and bytes, no work, default tonic and tokio
settings. Each round runs `densemesh-bench grpc` (one shared connection, one client thread) against every
target in turn, the order reversed every other round so drift on a shared machine falls on all; each
figure is the median over rounds. On a 2-core machine anything else running shows in the tail first:
before every run the 1-minute load average is read (the servers and the load generator count in it),
and during it the cores kept busy by other processes (/proc/stat less the servers' and the load
generator's own CPU time). Every process started is stopped by its pid at the end, also on error or
Ctrl-C. Prints a row per run, the medians, meshd's p99 over the echo's, and one JSON line.
"""
import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("requests_per_second", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "over_10ms", "server_cpu_us",
           "client_cpu_us")


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    release = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release"
    p.add_argument("--meshd", default=str(release / "meshd"), help="the meshd binary")
    p.add_argument("--bench", default=str(release / "densemesh-bench"), help="the densemesh-bench binary")
    p.add_argument("--candidate", action="append", default=[],
                   help="another meshd binary, measured in the same rounds as `candidate` (A/B; repeatable: "
                        "candidate2, ...)")
    p.add_argument("--meshd-arg", action="append", default=[], help="a flag for meshd (repeatable)")
    p.add_argument("--candidate-arg", action="append", default=[],
                   help="a flag for the candidates (repeatable; default: the same as --meshd-arg)")
    p.add_argument("--model-repo", default=str(REPO / "examples" / "models"))
    p.add_argument("--model", default="iris-logreg")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", default="10s", help="measured per run")
    p.add_argument("--warmup", default="2s", help="run before each measurement, not counted")
    p.add_argument("--no-echo", action="store_true", help="leave the echo floor out (A/B of meshd builds only)")
    return p.parse_args()


class Processes:
    """The servers this run started, each stopped by its own pid."""

    def __init__(self, work: Path):
        self.work = work
        self.started = []

    def start(self, name: str, cmd: list[str], addr_file: Path, timeout: float = 60) -> str:
        log = open(self.work / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "NO_COLOR": "1"})
        self.started.append((name, proc, log))
        deadline = time.monotonic() + timeout
        while not addr_file.exists():
            if proc.poll() is not None:
                sys.exit(f"{name} exited with {proc.returncode} while starting:\n{self.tail(name)}")
            if time.monotonic() > deadline:
                sys.exit(f"{name} did not listen within {timeout:.0f}s:\n{self.tail(name)}")
            time.sleep(0.05)
        return json.loads(addr_file.read_text())["grpc_addr"]

    def tail(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")[-3000:]

    def cpu_seconds(self, only: str | None = None) -> float:
        """CPU time of the servers started, or of the one named `only`."""
        return sum(cpu_seconds(proc.pid) for name, proc, _ in self.started if only in (None, name))

    def check_alive(self):
        for name, proc, _ in self.started:
            if proc.poll() is not None:
                sys.exit(f"{name} exited with {proc.returncode} during the run:\n{self.tail(name)}")

    def stop(self):
        for _, proc, log in reversed(self.started):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU time the whole machine has spent busy (every core, every process), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, open("/proc/stat").readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / TICK


def cpu_seconds(pid: int) -> float:
    """CPU time of one process (user + system), from /proc/PID/stat."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children_seconds() -> float:
    """CPU time of this script's waited-for children (the load generator runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def start_meshd(procs: Processes, name: str, binary: str, args, extra: list[str]) -> str:
    addr_file = procs.work / f"{name}.addr.json"
    cmd = [binary, "serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
           "--metrics-addr", "127.0.0.1:0", "--model-repo", args.model_repo, "--addr-file", str(addr_file),
           *extra]
    return procs.start(name, cmd, addr_file)


def measure(bench: str, label: str, addr: str, args) -> dict:
    cmd = [bench, "grpc", "--addr", addr, "--model", args.model, "--concurrency", str(args.concurrency),
           "--duration", args.duration, "--warmup", args.warmup, "--label", label]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        sys.exit(f"densemesh-bench grpc against {label} failed ({out.returncode}):\n{out.stderr}{out.stdout}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"densemesh-bench grpc against {label} printed no figures:\n{out.stdout}")
    return json.loads(lines[-1])["figures"]


def seconds(text: str) -> float:
    """A duration as densemesh-bench takes it (`10s`, `500ms`, `1m`) in seconds."""
    for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0), ("m", 60.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def measured(procs: Processes, bench: str, label: str, addr: str, args) -> tuple[dict, float, float]:
    """One run's figures, with the CPU time the target and the load generator spent per request (µs,
    warm-up included); the 1-minute load average before it; and the cores that processes other than
    the servers and the load generator kept busy during it (what else ran on the machine)."""
    load = os.getloadavg()[0]
    before = (time.monotonic(), busy_seconds(), procs.cpu_seconds(), children_seconds(), procs.cpu_seconds(label))
    figures = measure(bench, label, addr, args)
    procs.check_alive()
    after = (time.monotonic(), busy_seconds(), procs.cpu_seconds(), children_seconds(), procs.cpu_seconds(label))
    wall, busy, ours, client, server = (a - b for a, b in zip(after, before))
    requests = figures["requests_per_second"] * (seconds(args.warmup) + seconds(args.duration))
    figures["server_cpu_us"] = round(server / max(requests, 1) * 1e6, 1)
    figures["client_cpu_us"] = round(client / max(requests, 1) * 1e6, 1)
    return figures, load, max(busy - ours - client, 0.0) / wall


def row(label: str, f: dict, load: str, others: str) -> str:
    return (f"{label:<10} {f['requests_per_second']:>8.0f} {f['p50_us']:>7} {f['p90_us']:>7} {f['p99_us']:>7} "
            f"{f['p999_us']:>7} {f['max_us']:>8} {f['over_10ms']:>6} {f['errors']:>6} {f['server_cpu_us']:>7.1f} "
            f"{f['client_cpu_us']:>7.1f} {load:>6} {others:>7}")


HEADER = f"{'target':<10} {'req/s':>8} {'p50 µs':>7} {'p90 µs':>7} {'p99 µs':>7} {'p99.9':>7} {'max µs':>8} " \
         f"{'>10ms':>6} {'errors':>6} {'srv cpu':>7} {'cli cpu':>7} {'load':>6} {'others':>7}"


def interrupt(*_):
    raise KeyboardInterrupt


def main():
    args = parse()
    for path, what in ((args.meshd, "--meshd"), (args.bench, "--bench"), *((c, "--candidate") for c in args.candidate)):
        if not Path(path).is_file():
            sys.exit(f"{path} ({what}) is missing: cargo build --release -p densemesh-mesh --bins")
    # Ctrl-C raises KeyboardInterrupt; SIGTERM does the same, so `finally` stops the servers either way.
    signal.signal(signal.SIGTERM, interrupt)

    work = Path(tempfile.mkdtemp(prefix="densemesh-tail-"))
    procs = Processes(work)
    try:
        targets = [("meshd", start_meshd(procs, "meshd", args.meshd, args, args.meshd_arg))]
        candidates = [("candidate" if i == 0 else f"candidate{i + 1}", path) for i, path in enumerate(args.candidate)]
        for label, path in candidates:
            targets.append((label, start_meshd(procs, label, path, args, args.candidate_arg or args.meshd_arg)))
        if not args.no_echo:
            echo_file = work / "echo.addr.json"
            targets.append(("echo", procs.start("echo", [args.bench, "echo-server", "--like", targets[0][1],
                                                         "--model", args.model, "--addr-file", str(echo_file)],
                                                echo_file)))
        print(f"{args.concurrency} clients on {args.model}, {args.duration} measured after {args.warmup} per run, "
              f"{args.rounds} rounds; {os.cpu_count()} cores")
        print(f"meshd {args.meshd} {' '.join(args.meshd_arg)}".rstrip())
        for label, path in candidates:
            print(f"{label} {path} {' '.join(args.candidate_arg or args.meshd_arg)}".rstrip())
        print(HEADER)
        runs = {label: [] for label, _ in targets}
        loads, others = [], []
        for round_ in range(args.rounds):
            order = targets if round_ % 2 == 0 else list(reversed(targets))
            for label, addr in order:
                figures, load, busy = measured(procs, args.bench, label, addr, args)
                loads.append(load)
                others.append(busy)
                runs[label].append({**figures, "load_average": round(load, 2), "other_cores": round(busy, 3)})
                print(row(label, figures, f"{load:.2f}", f"{busy:.2f}"), flush=True)
                if figures["errors"]:
                    print(f"  first error: {figures['first_error']}")

        medians = {label: {k: round(statistics.median(f[k] for f in fs), 1 if k.endswith("cpu_us") else None)
                           for k in FIGURES}
                   for label, fs in runs.items()}
        errors = {label: sum(f["errors"] for f in fs) for label, fs in runs.items()}
        print(f"\nmedian of {args.rounds} rounds; 1-minute load average {min(loads):.2f}-{max(loads):.2f} (the "
              f"servers and the load generator count in it);\nother processes kept {max(others):.2f} cores busy "
              "at most; srv/cli cpu: CPU µs per request of the server and of the load generator")
        print(HEADER)
        for label, m in medians.items():
            print(row(label, {**m, "errors": errors[label]}, "", ""))
        summary = {"model": args.model, "concurrency": args.concurrency, "rounds": args.rounds,
                   "duration": args.duration, "cores": os.cpu_count(),
                   "load_average": [round(min(loads), 2), round(max(loads), 2)],
                   "other_cores_max": round(max(others), 3),
                   "medians": medians, "errors": errors, "runs": runs}
        if "echo" in medians:
            for label in (label for label, _ in targets if label != "echo"):
                ratio = medians[label]["p99_us"] / medians["echo"]["p99_us"]
                ratio_999 = medians[label]["p999_us"] / medians["echo"]["p999_us"]
                print(f"{label} p99 / echo p99: {ratio:.2f} (p99.9: {ratio_999:.2f})")
                summary[f"{label}_p99_over_echo"] = round(ratio, 3)
                summary[f"{label}_p999_over_echo"] = round(ratio_999, 3)
        print(json.dumps(summary))
        if any(errors.values()):
            sys.exit(f"requests failed: {errors}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
