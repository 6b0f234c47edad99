"""The GPU half of scripts/device-check.sh (read its header): run there, on the GPU machine, with
MESHD (the GPU build) and OUT set. Needs torch with CUDA, transformers and tokenizers, which the device
machines have; talks to meshd over its KServe V2 REST API with the standard library only."""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, decoders
from transformers import BertConfig, BertModel

MESHD = os.environ["MESHD"]
OUT = Path(os.environ["OUT"])
MODELS = 6          # models in the repository, each a different random BERT
ROOM_FOR = 2        # of which the GPU tier has room for this many
results = {"checks": {}, "figures": {}}


def check(name, ok, figure):
    results["checks"][name] = {"pass": bool(ok), "figure": figure}
    print(f"{'PASS' if ok else 'FAIL'} {name}: {figure}", flush=True)


WORDS = ("the a is was to of and in it on for with as at by from this that weather lovely today sunny "
         "outside he she drove stadium model mesh gpu host memory copy fast slow sentence embedding "
         "cat dog car road city night day good bad new old one two three many few").split()
SENTENCES = [
    "The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.", "",
    "a", "GPU memory as a tier: promotion and demotion.", "naïve café, 東京 and Zürich",
    " ".join(WORDS), " ".join(WORDS * 6),
] + [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 17)) for i in range(41)]


def make_tokenizer(path):
    """A BERT WordPiece tokenizer over a small vocabulary, as transformers' BertTokenizerFast writes one."""
    chars = sorted(set("".join(WORDS) + "abcdefghijklmnopqrstuvwxyz0123456789.,!?'’:;-"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + chars + ["##" + c for c in chars]
    vocab = list(dict.fromkeys(vocab))
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
    tok.decoder = decoders.WordPiece()
    tok.save(str(path))
    return len(vocab)


def make_models(repo):
    """MODELS random BERTs (mean pooling, normalized), each a sentence-transformers directory."""
    for i in range(MODELS):
        d = repo / f"bert-{i}"
        d.mkdir(parents=True)
        vocab = make_tokenizer(d / "tokenizer.json")
        torch.manual_seed(1000 + i)
        config = BertConfig(vocab_size=vocab, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                            intermediate_size=1536, max_position_embeddings=512)
        BertModel(config, add_pooling_layer=False).save_pretrained(d, safe_serialization=True)
        (d / "1_Pooling").mkdir()
        (d / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 384, "pooling_mode_mean_tokens": True}))
        (d / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))


def reference(model_dir, texts):
    """PyTorch on the GPU: the encoder, mean pooling over real tokens, unit length."""
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)
    model = BertModel.from_pretrained(model_dir, add_pooling_layer=False).to("cuda").eval()
    out = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok.encode(t).ids], device="cuda")
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
            v = hidden.mean(0)
            out.append((v / v.norm()).cpu())
    return torch.stack(out)


class Meshd:
    def __init__(self, name, repo, *args):
        self.dir = tempfile.TemporaryDirectory(prefix="device-check-")
        addr = Path(self.dir.name) / "addr.json"
        self.log = open(OUT / f"meshd-{name}.log", "wb")
        self.proc = subprocess.Popen([MESHD, "serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
                                      "--metrics-addr", "127.0.0.1:0", "--model-repo", str(repo),
                                      "--addr-file", str(addr), "--capacity", "16GiB", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while not (addr.exists() and addr.read_text().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"meshd did not start; see {self.log.name}")
            time.sleep(0.1)
        addrs = json.loads(addr.read_text())
        self.http, self.metrics_addr = addrs["http_addr"], addrs["metrics_addr"]

    def embed(self, model, texts):
        body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]})
        req = urllib.request.Request(f"http://{self.http}/v2/models/{model}/infer", body.encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())["outputs"][0]
        return torch.tensor(out["data"], dtype=torch.float32).reshape(out["shape"])

    def metrics(self):
        with urllib.request.urlopen(f"http://{self.metrics_addr}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {k: float(v) for k, v in (l.rsplit(" ", 1) for l in text.splitlines() if l and not l.startswith("#"))}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def p50_ms(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    servers = []
    try:
        run(servers)
    finally:
        for server in servers:
            server.stop()
        (OUT / "device-check.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    failed = [n for n, r in results["checks"].items() if not r["pass"]]
    sys.exit(1 if failed or not results["checks"] else 0)


def run(servers):
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="device-check-models-"))
    repo = work / "repo"
    make_models(repo)
    weights = (repo / "bert-0" / "model.safetensors").stat().st_size
    refs = {i: reference(repo / f"bert-{i}", SENTENCES) for i in range(MODELS)}

    # Room for ROOM_FOR copies on gpu0 (and none on any other device: this checks one device).
    capacity = int(weights * (ROOM_FOR + 0.5))
    gpu = Meshd("gpu", repo, "--gpu-capacity", f"0,0={capacity}")
    servers.append(gpu)
    m = gpu.metrics()
    gpu0_capacity = m.get('densemesh_capacity_bytes{tier="gpu0"}')
    check("meshd finds the GPU and gives it its --gpu-capacity", gpu0_capacity == capacity,
          f"gpu0 capacity {gpu0_capacity} bytes, {weights} bytes of weights per model")

    worst = 1.0
    for i in range(MODELS):
        got = gpu.embed(f"bert-{i}", SENTENCES)
        worst = min(worst, torch.nn.functional.cosine_similarity(got, refs[i], dim=1).min().item())
    check("GPU answers match PyTorch on the same GPU (cosine >= 0.9999)", worst >= 0.9999, f"worst cosine {worst:.6f}")

    # Past capacity: every model in turn, three rounds, each answer checked. Promotions are timed from
    # here: the first ones above paid for opening the device (context, stream, cuBLAS handle).
    before = gpu.metrics()
    worst = 1.0
    for _ in range(3):
        for i in range(MODELS):
            got = gpu.embed(f"bert-{i}", SENTENCES[:8])
            worst = min(worst, torch.nn.functional.cosine_similarity(got, refs[i][:8], dim=1).min().item())
    m = gpu.metrics()
    on_gpu0 = m.get('densemesh_gpu_models{tier="gpu0"}', 0)
    promotions, demotions = m.get("densemesh_gpu_promotions_total", 0), m.get("densemesh_gpu_demotions_total", 0)
    check("filled past capacity, answers stay right and models move both ways",
          worst >= 0.9999 and promotions > MODELS and demotions > 0,
          f"worst cosine {worst:.6f}, {promotions:.0f} promotions, {demotions:.0f} demotions, "
          f"{on_gpu0:.0f} models on gpu0")

    # Promotion bandwidth against a pinned copy of the same bytes.
    timed = "densemesh_gpu_promotion_duration_seconds"
    count = m.get(f"{timed}_count", 0) - before.get(f"{timed}_count", 0)
    if count <= 0:
        check("promotions happened while the tier was filled", False, "none")
        return
    mean_promotion = (m[f"{timed}_sum"] - before.get(f"{timed}_sum", 0)) / count
    device_bytes = m['densemesh_used_bytes{tier="gpu0"}'] / max(m['densemesh_gpu_models{tier="gpu0"}'], 1)
    ours = device_bytes / mean_promotion
    host = torch.empty(int(device_bytes), dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    copies = []
    for _ in range(20):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        copies.append(time.perf_counter() - t)
    pinned = device_bytes / statistics.median(copies)
    check("promotion bandwidth >= 70% of a pinned host-to-device copy", ours >= 0.7 * pinned,
          f"{ours / 1e9:.2f} GB/s against {pinned / 1e9:.2f} GB/s pinned ({100 * ours / pinned:.0f}%)")
    results["figures"].update(promotion_gbps=ours / 1e9, pinned_gbps=pinned / 1e9)

    # GPU against CPU, the same model: bert-0 kept hot on the GPU pod; a pod with no GPU room.
    cpu = Meshd("cpu", repo, "--gpu-capacity", "0")
    servers.append(cpu)
    for batch in (1, 32):
        texts = (SENTENCES * 4)[:batch]
        gpu.embed("bert-0", texts), cpu.embed("bert-0", texts)
        g, c = p50_ms(lambda: gpu.embed("bert-0", texts), 50), p50_ms(lambda: cpu.embed("bert-0", texts), 50)
        results["figures"][f"batch{batch}_p50_ms"] = {"gpu": g, "cpu": c}
        check(f"batch {batch}: GPU and CPU p50 measured", True, f"GPU {g:.2f} ms, CPU {c:.2f} ms ({c / g:.1f}x)")
    results["device"] = torch.cuda.get_device_name(0)


if __name__ == "__main__":
    main()
