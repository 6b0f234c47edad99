"""Prints bench/run.sh's summary from its results file (one JSON object a line).

    python bench/summary.py bench/out/results.jsonl
"""
import json
import os
import sys


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]

    def find(kind, label=None, concurrency=None):
        for r in rows:
            run = r["run"]
            if run["kind"] == kind and label in (None, run.get("label")) and concurrency in (None, run.get("concurrency")):
                return r["figures"]
        sys.exit(f"{path} has no {kind} {label or ''} c={concurrency} result; did a step fail?")

    print(f"\n== summary ({os.cpu_count()} cores shared by clients and servers, 127.0.0.1)")
    head = f"{'':26}{'c':>3}{'req/s':>10}{'p50 µs':>9}{'p90 µs':>9}{'p99 µs':>9}{'p99.9':>9}{'max µs':>9}{'>10ms':>7}{'errors':>8}"
    print(head)
    names = [("meshd", "meshd (ONNX, V2 gRPC)"), ("inproc", "in-process ONNX Runtime"),
             ("mlserver", "MLServer (scikit-learn)")]
    for label, name in names:
        for c in (1, 8):
            f = find("inproc" if label == "inproc" else "grpc", label, c)
            print(f"{name if c == 1 else '':26}{c:>3}{f['requests_per_second']:>10.0f}{f['p50_us']:>9}{f['p90_us']:>9}"
                  f"{f['p99_us']:>9}{f['p999_us']:>9}{f['max_us']:>9}{f['over_10ms']:>7}{f['errors']:>8}")
    floor = find("grpc", "grpc-floor", 1)
    print(f"{'bare gRPC (ServerLive)':26}{1:>3}{floor['requests_per_second']:>10.0f}{floor['p50_us']:>9}{floor['p90_us']:>9}"
          f"{floor['p99_us']:>9}{floor['p999_us']:>9}{floor['max_us']:>9}{floor['over_10ms']:>7}{floor['errors']:>8}")

    def verdict(ok):
        return "met" if ok else "NOT met"

    print(f"\n{'target':52}{'measured':>18}   {'goal':<10}")
    for c in (1, 8):
        m, s = find("grpc", "meshd", c), find("grpc", "mlserver", c)
        ratio = m["requests_per_second"] / s["requests_per_second"]
        print(f"{f'meshd req/s ÷ MLServer req/s, c={c}':52}{ratio:>17.1f}×   ≥ 10×      {verdict(ratio >= 10)}")
    m1, i1 = find("grpc", "meshd", 1), find("inproc", "inproc", 1)
    added = m1["p50_us"] - i1["p50_us"]
    print(f"{'p50 added by meshd over in-process ORT, c=1':52}{added:>15} µs   ≤ 50 µs    {verdict(added <= 50)}")
    print(f"{'  of which the bare gRPC round trip (ServerLive p50)':52}{floor['p50_us']:>15} µs")
    print(f"{'  left for meshd (decode, route, lease, encode)':52}{added - floor['p50_us']:>15} µs")
    cold = find("cold-load")
    cache = "page cache dropped" if cold["page_cache_dropped"] else "page cache WARM"
    what = f"cold load {cold['bytes'] / 1e6:.0f} MB from disk ({cache}), median"
    print(f"{what:52}{cold['disk_ms']:>15.0f} ms")
    print(f"{'  from bytes already in memory, median':52}{cold['memory_ms']:>15.0f} ms")
    first = find("first-request")
    cache = "page cache dropped" if first["page_cache_dropped"] else "page cache warm"
    print(f"{f'first request to a fresh meshd ({cache})':52}{first['cold_ms']:>15.0f} ms")
    print(f"{'  the second request':52}{first['hot_ms']:>15.1f} ms")
    errors = sum(r["figures"].get("errors", 0) + r["figures"].get("warmup_errors", 0) for r in rows)
    if errors:
        print(f"\n{errors} requests failed; see the first error printed with each run above")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/out/results.jsonl")
