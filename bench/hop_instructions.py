"""Instructions per call that meshd executes passing a scikit-learn ModelInfer to MLServer, beside a bare
HTTP/2 relay (`densemesh-bench relay`) in the same place: the one figure of the hop that does not drift
with the host. Each runs under callgrind; its counters are zeroed after the warm-up pairs and dumped after
the timed ones (`densemesh-bench pair`), and the dump's total is divided by the calls. The top crates by
instructions are printed too (a function counts under the crate its name starts with).

    apt-get install -y valgrind
    .venv/bin/python bench/hop_instructions.py --bin-dir target/release     # ~3 minutes

Needs meshd and densemesh-bench in --bin-dir, the .venv and .venv-mlserver that scripts/setup.sh makes.
Background work in meshd (heartbeats, metrics) during the timed calls counts too: a few hundred
instructions per call at most.
"""
import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import runtimes as rt
from meshd import Meshd, wait_for


def callgrind(binary, out_dir, cache_sim=False):
    return ["valgrind", "--tool=callgrind", "--dump-instr=no", f"--cache-sim={'yes' if cache_sim else 'no'}",
            f"--callgrind-out-file={out_dir}/callgrind.out.%p", str(binary)]


def pairs(bench, via, direct, n, warmup):
    subprocess.run([str(bench), "pair", "--via", via, "--direct", direct, "--model", "iris-sk",
                    "--input", "input-0:FP64:1x4", "--pairs", str(n), "--warmup", str(warmup), "--blocks", "1",
                    "--timeout", "60s"], check=True, capture_output=True, timeout=1200)


def count(bench, pid, via, direct, args, out_dir):
    """Instructions per call of process `pid` over `args.pairs` calls, and by crate."""
    pairs(bench, via, direct, args.warmup, 0)
    subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, capture_output=True)
    pairs(bench, via, direct, args.pairs, 0)
    subprocess.run(["callgrind_control", "--dump=timed", str(pid)], check=True, capture_output=True)
    dump = wait_for(lambda: sorted(Path(out_dir).glob(f"callgrind.out.{pid}.*")), 60, "the callgrind dump")[-1]
    time.sleep(1)  # written whole by now
    by_crate = self_costs(dump)
    total = sum(by_crate.values())
    return {"instructions_per_call": round(total / args.pairs),
            "top_crates_per_call": {k: round(v / args.pairs) for k, v in by_crate.most_common(8)}}


def self_costs(dump):
    """Self cost per crate from a callgrind dump (call lines carry inclusive costs and are skipped)."""
    names, costs, fn, after_call = {}, collections.Counter(), "", False
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("fn=", "cfn=")):
            # A function is named once, where it first appears (as caller or callee), then by number.
            text = line.split("=", 1)[1]
            m = re.match(r"\((\d+)\)(?: (.*))?", text)
            if m and m.group(2):
                names[m.group(1)] = m.group(2)
            if line.startswith("fn="):
                fn = names.get(m.group(1), text) if m else text
        elif line.startswith("calls="):
            after_call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if len(parts) >= 2 and not after_call:
                costs[crate(fn)] += int(parts[1])
            after_call = False
    return costs


def crate(function):
    name = re.sub(r"^(core::ptr::drop_in_place<)?[<&]*(mut |dyn )?", "", function)
    m = re.match(r"[A-Za-z_0-9]+", name)
    return m.group(0) if m else name[:20]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", default=str(rt.REPO / "target" / "release"))
    parser.add_argument("--pairs", type=int, default=1000, help="calls counted")
    parser.add_argument("--warmup", type=int, default=300, help="calls before the counters are zeroed")
    parser.add_argument("--cache-sim", action="store_true",
                        help="simulate the caches too (I1/D1/LL misses in the dumps; several times slower)")
    parser.add_argument("--keep-dumps", metavar="DIR", help="copy the callgrind dumps here (callgrind_annotate reads them)")
    args = parser.parse_args()
    bin_dir = Path(args.bin_dir).resolve()
    bench = bin_dir / "densemesh-bench"
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-hop-instructions-") as work:
        work = Path(work)
        models = work / "trained"
        models.mkdir()
        subprocess.run([str(rt.MLSERVER / "python"), str(rt.REPO / "runtimes/remote/tests/make_models.py"), str(models)],
                       check=True, timeout=300)
        proc, grpc_port, repository, _ = rt.start_mlserver(work)
        direct = f"127.0.0.1:{grpc_port}"
        config = work / "runtimes.json"
        config.write_text(json.dumps({"runtimes": [{"kind": "v2", "name": "mlserver", "supportedModelFormats": ["sklearn"],
                                                    "endpoint": direct, "repository": str(repository)}]}))
        wrapper = work / "meshd"
        wrapper.write_text("#!/bin/sh\nexec " + " ".join(callgrind(bin_dir / "meshd", work, args.cache_sim)) + ' "$@"\n')
        wrapper.chmod(0o755)
        os.environ["MESHD_BIN"] = str(wrapper)
        repo = work / "repo"
        repo.mkdir()
        server = relay = None
        try:
            server = Meshd(repo, "--runtime-config", str(config), "--local-model-roots", str(models))
            pb2, pb2_grpc = rt.mmesh_stubs()
            pb2_grpc.ModelMeshStub(server.channel).registerModel(pb2.RegisterModelRequest(
                modelId="iris-sk", modelInfo=pb2.ModelInfo(type="sklearn", path=str(models / "sklearn.joblib")),
                loadNow=True, sync=True), timeout=600)
            results["meshd"] = count(bench, server.proc.pid, server.grpc_addr, direct, args, work)
            addr_file = work / "relay.json"
            relay = subprocess.Popen(callgrind(bench, work, args.cache_sim) + ["relay", "--to", direct, "--addr-file", str(addr_file)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            addr = wait_for(lambda: addr_file.exists() and json.loads(addr_file.read_text() or "{}").get("grpc_addr"),
                            120, "the relay to listen")
            results["relay"] = count(bench, relay.pid, addr, direct, args, work)
            if args.keep_dumps:
                kept = Path(args.keep_dumps)
                kept.mkdir(parents=True, exist_ok=True)
                for name, pid in (("meshd", server.proc.pid), ("relay", relay.pid)):
                    shutil.copy(sorted(work.glob(f"callgrind.out.{pid}.*"))[-1], kept / f"callgrind.{name}")
        finally:
            if relay:
                relay.kill()
                relay.wait(timeout=30)
            if server:
                server.stop()
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
