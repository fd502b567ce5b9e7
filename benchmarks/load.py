"""Load benchmark: N concurrent clients against the OpenAI-compatible server on loopback, vs the same requests
served one at a time, in one run against one server.

Decode-heavy load: a short text prompt (~20 tokens) and a long greedy answer (`--max-tokens`, default 96). Each phase
runs for a bounded time (`--seconds`) and count (`--max-requests`); requests in flight at the deadline finish and
count. Reports completion-token throughput, requests/s, p50/p99 latency and errors for each phase, and the speedup.

    python benchmarks/load.py                        # builds a random-weight 256M-shape folder, starts the server
    python benchmarks/load.py --clients 32 --seconds 60 --json
    python benchmarks/load.py --url http://127.0.0.1:8000 --model-name NAME   # an already running server

Results go to benchmarks/results/load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).parent
RESULTS = HERE / "results"
TOPICS = ["the sea", "a small robot", "an old library", "mountains at dawn", "a city at night", "a garden",
          "a long train journey", "the first snow"]  # fmt: skip


def build_folder(directory: Path) -> Path:
    """A SmolVLM-256M-shaped folder with random weights and the test fixtures' tokenizer padded to 49280 tokens."""
    if (directory / "model.safetensors").is_file():
        return directory
    sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
    from generate import build_checkpoint
    from processing_fixtures import write_processor_folder
    from tokenizers import AddedToken, Tokenizer

    from smolvlm.config import SmolVLMConfig

    write_processor_folder(directory, family="512", layout="v4")
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    filler = [AddedToken(f" w{i}", special=False, normalized=False) for i in range(49280 - tokenizer.get_vocab_size())]
    tokenizer.add_tokens(filler)  # every id the random model can emit decodes to text
    tokenizer.save(str(directory / "tokenizer.json"))
    build_checkpoint("256M", directory)
    config = SmolVLMConfig.from_json_file(directory / "config.json")
    config.image_token_id = tokenizer.token_to_id("<image>")
    config.save(directory)
    return directory


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, name: str, max_batch_size: int, threads: int | None,
                 log: Path) -> tuple[subprocess.Popen, str]:  # fmt: skip
    """Start `python -m smolvlm.serve` on a free loopback port; wait for /health."""
    port = free_port()
    command = [sys.executable, "-m", "smolvlm.serve", "-m", str(model), "--served-model-name", name, "--host",
               "127.0.0.1", "--port", str(port), "--max-batch-size", str(max_batch_size), "--max-queue", "256",
               "--device", "cpu", "--log-level", "warning"]  # fmt: skip
    if threads:
        command += ["--threads", str(threads)]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"server did not come up in 300 s; see {log}")


def request_body(model: str, index: int, max_tokens: int) -> dict:
    """The index-th request of the load: a short prompt asking for a long answer, greedy."""
    topic = TOPICS[index % len(TOPICS)]
    prompt = f"Write a long story about {topic}, request {index}."
    return {"model": model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}]}  # fmt: skip


async def run_phase(url: str, model: str, clients: int, seconds: float, max_requests: int, max_tokens: int) -> dict:
    """`clients` loops sending requests until the deadline or the request budget is spent."""
    latencies: list[float] = []
    tokens = 0
    errors: list[str] = []
    issued = 0
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, issued
        while time.perf_counter() < deadline and issued < max_requests:
            index = issued
            issued += 1
            start = time.perf_counter()
            try:
                response = await http.post("/v1/chat/completions", json=request_body(model, index, max_tokens))
                if response.status_code != 200:
                    errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    continue
                tokens += response.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - start)
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()

    def percentile(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "wall_seconds": round(wall, 2),
        "completion_tokens": tokens,
        "tokens_per_second": round(tokens / wall, 2),
        "requests_per_second": round(len(latencies) / wall, 3),
        "latency_p50_seconds": round(percentile(0.50), 3),
        "latency_p99_seconds": round(percentile(0.99), 3),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the sequential baseline and the concurrent load; print and save the results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="an already running server (default: start one on a free loopback port)")
    p.add_argument("--model", type=Path, help="model folder for the started server (default: build 256M random)")
    p.add_argument("--model-name", default="bench", help="the served model name")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0, help="time budget of each phase")
    p.add_argument("--max-requests", type=int, default=512, help="request budget of each phase")
    p.add_argument("--max-tokens", type=int, default=64, help="answer length (decode-heavy load)")
    p.add_argument("--threads", type=int, help="torch threads of the started server (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", type=Path, default=RESULTS / "load.json")
    args = p.parse_args(argv)
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        p.error("the load benchmark runs on loopback only")

    process = None
    url = args.url
    if url is None:
        folder = args.model or build_folder(Path(tempfile.gettempdir()) / "smolvlm-256m-random")
        log = Path(tempfile.gettempdir()) / "load-server.log"
        process, url = start_server(folder, args.model_name, args.clients, args.threads, log)
    try:
        phase = (url, args.model_name)
        asyncio.run(run_phase(*phase, 2, args.seconds, 2, 8))  # warm-up: first-request costs are not measured
        sequential = asyncio.run(run_phase(*phase, 1, args.seconds, args.max_requests, args.max_tokens))
        concurrent = asyncio.run(run_phase(*phase, args.clients, args.seconds, args.max_requests, args.max_tokens))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    results = {
        "load": f"decode-heavy: ~20-token text prompt, greedy answers of up to {args.max_tokens} tokens",
        "model": str(args.model or args.url or "SmolVLM-256M shape, random weights"),
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "server_torch_threads": args.threads or "torch default",
        "platform": platform.platform(),
        "seconds_per_phase": args.seconds,
        "sequential": sequential,
        "concurrent": concurrent,
        "speedup": round(concurrent["tokens_per_second"] / max(sequential["tokens_per_second"], 1e-9), 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name in ("sequential", "concurrent"):
            r = results[name]
            print(f"{name:>10}: {r['clients']:>3} clients  {r['requests']:>4} requests  {r['errors']} errors  "
                  f"{r['tokens_per_second']:8.1f} tok/s  p50 {r['latency_p50_seconds']:.2f} s  "
                  f"p99 {r['latency_p99_seconds']:.2f} s")  # fmt: skip
        print(f"speedup: {results['speedup']}x  ({results['load']})")
    return 0 if concurrent["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
