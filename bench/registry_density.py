"""Registry density: what registering many models costs meshd, none of them loaded.

Makes `--count` model directories under `--root` (`<root>/m<NNNNNNN>/model.onnx`, empty files: no
model is ever loaded, so only names and directories matter, and empty files take no disk blocks),
starts meshd on the embedded store with `--model-repo <root>`, and reports:
- seconds from meshd's start to all models registered (on the embedded store meshd registers its
  repository before it serves, so this is the time until it writes its address file);
- meshd's resident set (VmRSS) once the leader's repository pass has settled, and per model
  against a meshd started on an empty repository in the same run;
- how many inotify watches meshd holds (from /proc/<pid>/fdinfo), against the kernel's
  `max_user_watches`.

Usage: python3 bench/registry_density.py --count 1000000 [--meshd target/release/meshd]
       [--root /tmp/densemesh-registry] [--keep]
Stdlib only. The directories are deleted afterwards unless `--keep` (a later run with the same
`--root` and `--count` reuses them). See bench/README.md.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KIB = 1024


def reusable(root: Path, count: int) -> bool:
    """Whether `root` holds a complete repository of `count` models from an earlier run; if not, it is
    emptied for a new one (marked complete with `stamp(root, count)`)."""
    done = root / ".complete"
    if done.exists() and done.read_text() == str(count):
        return True
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    return False


def stamp(root: Path, count: int):
    (root / ".complete").write_text(str(count))


def make_repository(root: Path, count: int):
    if reusable(root, count):
        return 0.0
    start = time.monotonic()
    for i in range(count):
        d = root / f"m{i:07d}"
        d.mkdir()
        (d / "model.onnx").touch()
    stamp(root, count)
    return time.monotonic() - start


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KIB
    raise RuntimeError("no VmRSS")


def inotify_watches(pid: int) -> int:
    watches = 0
    for fd in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            watches += sum(1 for line in fd.read_text().splitlines() if line.startswith("inotify wd:"))
        except OSError:
            pass
    return watches


def registered(metrics_addr: str) -> int:
    with urllib.request.urlopen(f"http://{metrics_addr}/api/v1/cluster", timeout=600) as answer:
        return int(json.load(answer)["models_registered"])


def run_meshd(meshd: str, root: Path, work: Path, log_name: str, expect: int, deadline_s: float):
    """Starts meshd on `root`; returns (seconds to serving, settled RSS, watches, registered)."""
    addr = work / f"{log_name}.addr"
    log = open(work / f"{log_name}.log", "w")
    start = time.monotonic()
    proc = subprocess.Popen(
        [meshd, "serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
         "--metrics-addr", "127.0.0.1:0", "--model-repo", str(root), "--addr-file", str(addr),
         "--cache-dir", str(work / f"{log_name}-cache")],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "info"})
    try:
        while not addr.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"meshd exited with {proc.returncode}; see {log.name}")
            if time.monotonic() - start > deadline_s:
                raise RuntimeError(f"meshd not serving after {deadline_s} s")
            time.sleep(0.05)
        serving = time.monotonic() - start
        metrics_addr = json.loads(addr.read_text())["metrics_addr"]
        # The leader's own pass over the repository follows; wait for it, then for RSS to settle.
        while "model repository synced" not in Path(log.name).read_text():
            if time.monotonic() - start > deadline_s * 3:
                raise RuntimeError("the leader's repository pass did not finish")
            time.sleep(0.2)
        last, steady = rss_bytes(proc.pid), 0
        while steady < 3:
            time.sleep(1)
            now = rss_bytes(proc.pid)
            steady = steady + 1 if abs(now - last) < 1 << 20 else 0
            last = now
        count = registered(metrics_addr)
        if count != expect:
            raise RuntimeError(f"{count} models registered, expected {expect}")
        return serving, last, inotify_watches(proc.pid), count
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--meshd", default=str(REPO / "target" / "release" / "meshd"))
    parser.add_argument("--root", default="/tmp/densemesh-registry")
    parser.add_argument("--keep", action="store_true", help="keep the model directories")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds to wait for meshd")
    args = parser.parse_args()

    root = Path(args.root)
    work = Path(tempfile.mkdtemp(prefix="registry-density-"))
    empty = work / "empty-repo"
    empty.mkdir()
    try:
        made = make_repository(root, args.count)
        _, base_rss, _, _ = run_meshd(args.meshd, empty, work, "empty", 0, args.deadline)
        serving, rss, watches, count = run_meshd(args.meshd, root, work, "full", args.count, args.deadline)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work / "empty-cache", ignore_errors=True)
        shutil.rmtree(work / "full-cache", ignore_errors=True)
    max_watches = int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
    per_model = (rss - base_rss) / count
    print(f"models registered from {root}: {count:,} (directories made in {made:.0f} s)")
    print(f"start to all registered: {serving:.1f} s (goal <= 60 s)")
    print(f"RSS: {rss / 2**20:.0f} MiB, empty repository {base_rss / 2**20:.0f} MiB: "
          f"{per_model:.0f} B ({per_model / KIB:.2f} KiB) per registered model (goal <= 2 KiB)")
    print(f"inotify watches held: {watches} (kernel limit {max_watches:,})")
    print("JSON " + json.dumps({"kind": "registry-density", "count": count, "start_to_registered_s": serving,
                                "rss_bytes": rss, "empty_rss_bytes": base_rss, "bytes_per_model": per_model,
                                "inotify_watches": watches, "logs": str(work)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
