"""TLS against plaintext: req/s and latency of one small model through meshd, with and without (mutual) TLS.

    .venv/bin/python bench/tls.py                         # release build, c=1 and c=16, 10 s each, 2 rounds
    .venv/bin/python bench/tls.py --bin-dir target/debug --duration 3s --rounds 1

One meshd serves the example models plainly, another with --tls-dir (a certificate and ca.crt: mutual
TLS, the client presents a certificate). `meshctl bench` drives iris-logreg on each with persistent
connections, so the handshake is paid once and the figures show TLS's per-request cost (record
encryption, and the copies it adds). The two meshd alternate round by round, so drift on a shared
machine falls on both; each figure is the median of its rounds. Certificates are made with openssl
(tests/e2e/certs.py).
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from certs import issue, make_ca  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", default=str(REPO / "target" / "release"))
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--duration", default="10s")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default="iris-logreg")
    return p.parse_args()


def bench(meshctl, server, model, concurrency, duration, tls):
    args = [str(meshctl), "bench", model, "--addr", server.grpc_addr, "--concurrency", str(concurrency),
            "--duration", duration, "--warmup", "2s", "-o", "json", *tls]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        sys.exit(f"meshctl bench failed: {out.stderr}")
    result = json.loads(out.stdout)
    if result["errors"]:
        sys.exit(f"{result['errors']} errors: {result['first_error']}")
    return result


def main():
    args = parse()
    import os

    bin_dir = Path(args.bin_dir)
    for name in ("meshd", "meshctl"):
        if not (bin_dir / name).exists():
            sys.exit(f"{bin_dir / name} is missing: cargo build --release -p densemesh-mesh --bins (or --bin-dir)")
    os.environ["MESHD_BIN"] = str(bin_dir / "meshd")
    from meshd import EXAMPLES, Meshd

    work = Path(tempfile.mkdtemp(prefix="densemesh-tls-bench-"))
    servers = []
    try:
        make_ca(work, "ca")
        issue(work, "server", "ca")
        issue(work, "client", "ca")
        secret = work / "secret"
        secret.mkdir()
        for src, dst in (("server.crt", "tls.crt"), ("server.key", "tls.key"), ("ca.crt", "ca.crt")):
            shutil.copy(work / src, secret / dst)
        plain = Meshd(EXAMPLES, "--capacity", "256MiB")
        servers.append(plain)
        secure = Meshd(EXAMPLES, "--capacity", "256MiB", "--tls-dir", str(secret))
        servers.append(secure)
        client_tls = ["--tls-ca", str(work / "ca.crt"), "--tls-cert", str(work / "client.crt"),
                      "--tls-key", str(work / "client.key")]
        results = {}
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            for _ in range(args.rounds):
                for label, server, tls in (("plaintext", plain, []), ("mutual TLS", secure, client_tls)):
                    r = bench(bin_dir / "meshctl", server, args.model, concurrency, args.duration, tls)
                    results.setdefault((label, concurrency), []).append(r)
                    print(f"  {label:>10} c={concurrency:<3} {r['requests_per_second']:>9.0f} req/s "
                          f"p50 {r['p50_us']} µs p99 {r['p99_us']} µs", flush=True)
        print(f"\n{args.model}, {args.duration} per run, median of {args.rounds} rounds:")
        print(f"{'':>10} {'c':>3} {'req/s':>9} {'p50 µs':>7} {'p99 µs':>7}")
        for (label, concurrency), runs in results.items():
            med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
            print(f"{label:>10} {concurrency:>3} {med('requests_per_second'):>9.0f} {med('p50_us'):>7.0f} "
                  f"{med('p99_us'):>7.0f}")
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
