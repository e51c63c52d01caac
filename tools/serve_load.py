"""Load on `edge-runtime serve`: many clients at once, and whether taking turns changes any answer.

The server runs one generation at a time (one model, one KV cache) and queues the rest, so concurrent clients
cannot raise its tokens/s, but they must not change what it says either: a greedy reply depends on its prompt
alone, not on which requests ran before it and left their prefix in the KV cache. So, after one uncounted warm-up
request, N clients send M distinct greedy chat completions each, all at once (each client waits for its reply
before its next request); then the same requests run again one at a time, and every concurrent answer must equal
its sequential one. Mismatches and failed requests (any status but 200, an error event in a stream) are printed
and make the exit code 1.

Printed: requests, wall time, requests/s, latency p50/p95/max, generated tokens and tokens/s (from `usage`) for
both runs, and the server's peak RSS (its /metrics gauge edge_runtime_peak_resident_memory_bytes, else the VmHWM
of the server process started here). Unless --url names a running server, one is started on a free port with
--queue at least the number of clients (a fuller line would answer 429).

    python tools/serve_load.py -m ARTIFACT [--clients 10 --requests 5 --max-tokens 32 --stream --json]
    python tools/serve_load.py --url http://kiosk.local:8080 --api-key KEY
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

QUESTIONS = (
    "Why is {} important?",
    "Describe {} in two sentences.",
    "What is a common mistake people make about {}?",
    "Write a short poem about {}.",
    "How would you explain {} to a child?",
    "List three facts about {}.",
    "What changed about {} in the last hundred years?",
    "Give one practical tip about {}.",
)
SUBJECTS = ("the sky", "bread", "a lighthouse", "rivers", "the moon", "bicycles", "libraries", "honey bees",
            "winter", "trains", "volcanoes", "the piano")
PEAK_METRIC = "edge_runtime_peak_resident_memory_bytes"


def prompts(count: int) -> list[str]:
    """`count` distinct questions: every question about every subject, then numbered rounds of them again."""
    grid = [q.format(s) for s in SUBJECTS for q in QUESTIONS]
    return [grid[i % len(grid)] + (f" (round {i // len(grid) + 1})" if i >= len(grid) else "") for i in range(count)]


@dataclass
class Reply:
    """One request's outcome: the text, `usage` tokens, seconds to the end (and to the first token, streamed)."""

    status: int
    text: str
    tokens: int
    seconds: float
    first_token_seconds: float | None = None
    error: str | None = None


def ask(client: httpx.Client, prompt: str, max_tokens: int, stream: bool) -> Reply:
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    try:
        if not stream:
            response = client.post("/v1/chat/completions", json=body)
            seconds = time.perf_counter() - start
            if response.status_code != 200:
                return Reply(response.status_code, "", 0, seconds, error=response.text[:300])
            data = response.json()
            return Reply(200, data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"], seconds)
        pieces, tokens, first, error = [], 0, None, None
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return Reply(response.status_code, "", 0, time.perf_counter() - start,
                             error=response.read().decode(errors="replace")[:300])
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"].get("message", str(chunk["error"]))
                for choice in chunk.get("choices") or []:
                    if content := choice["delta"].get("content"):
                        first = first if first is not None else time.perf_counter() - start
                        pieces.append(content)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return Reply(200, "".join(pieces), tokens, time.perf_counter() - start, first, error)
    except httpx.HTTPError as exc:
        return Reply(0, "", 0, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")


def run_concurrently(url: str, headers: dict[str, str], work: list[list[str]], max_tokens: int, stream: bool,
                     timeout: float) -> tuple[list[list[Reply]], float]:
    """Each client (a thread with its own connection) sends its prompts one after another; all clients at once."""

    def client_run(client_prompts: list[str]) -> list[Reply]:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
            return [ask(client, p, max_tokens, stream) for p in client_prompts]

    start = time.perf_counter()
    with ThreadPoolExecutor(len(work)) as pool:
        replies = list(pool.map(client_run, work))
    return replies, time.perf_counter() - start


def run_sequentially(url: str, headers: dict[str, str], work: list[list[str]], max_tokens: int, stream: bool,
                     timeout: float) -> tuple[list[list[Reply]], float]:
    start = time.perf_counter()
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
        replies = [[ask(client, p, max_tokens, stream) for p in client_prompts] for client_prompts in work]
    return replies, time.perf_counter() - start


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile: a value that was measured, not interpolated between two."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def summary(replies: list[Reply], wall: float) -> dict:
    ok = [r for r in replies if r.status == 200 and r.error is None]
    latencies = [r.seconds * 1000 for r in ok] or [0.0]
    tokens = sum(r.tokens for r in ok)
    result = {"requests": len(replies), "errors": len(replies) - len(ok), "wall_s": wall,
              "requests_per_s": len(replies) / wall, "latency_p50_ms": percentile(latencies, 0.5),
              "latency_p95_ms": percentile(latencies, 0.95), "latency_max_ms": max(latencies),
              "generated_tokens": tokens, "tokens_per_s": tokens / wall}
    if firsts := [r.first_token_seconds * 1000 for r in ok if r.first_token_seconds is not None]:
        result["first_token_p50_ms"] = percentile(firsts, 0.5)
    return result


def peak_rss(url: str, headers: dict[str, str], pid: int | None) -> tuple[int | None, str]:
    """The server's peak RSS in bytes, and where it was read."""
    try:
        text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
        if found := re.search(rf"^{PEAK_METRIC} ([0-9.e+]+)$", text, re.MULTILINE):
            return int(float(found.group(1))), "/metrics"
    except httpx.HTTPError:
        pass
    if pid is not None:
        status = Path(f"/proc/{pid}/status").read_text()
        if found := re.search(r"^VmHWM:\s*(\d+) kB", status, re.MULTILINE):
            return int(found.group(1)) * 1024, f"VmHWM of pid {pid}"
    return None, "not available"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(artifact: Path, port: int, queue: int, profile: str | None, log: Path,
                 timeout: float) -> subprocess.Popen:
    """`python -m edge_runtime serve` in the background, returned once /health answers."""
    command = [sys.executable, "-m", "edge_runtime", "serve", "-m", str(artifact), "--port", str(port),
               "--queue", str(queue), "--log-level", "warning", *(["--profile", profile] if profile else [])]
    with log.open("wb") as stderr:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"{' '.join(command)} exited with {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s:\n{log.read_text()}")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def report(result: dict) -> None:
    print(f"{result['clients']} clients x {result['requests_per_client']} requests, max_tokens "
          f"{result['max_tokens']}, {'streamed' if result['stream'] else 'JSON'}, greedy")
    for phase in ("concurrent", "sequential"):
        s = result[phase]
        first = f", first token p50 {s['first_token_p50_ms']:.0f} ms" if "first_token_p50_ms" in s else ""
        print(f"{phase:<10}  {s['requests']} requests in {s['wall_s']:.1f} s: {s['requests_per_s']:.2f} req/s, "
              f"latency p50 {s['latency_p50_ms']:.0f} / p95 {s['latency_p95_ms']:.0f} / max "
              f"{s['latency_max_ms']:.0f} ms{first}; {s['generated_tokens']} tokens, {s['tokens_per_s']:.1f} tokens/s, "
              f"{s['errors']} errors")
    peak = result["peak_rss_bytes"]
    print(f"peak RSS    {peak / 2**20:.0f} MiB ({result['peak_rss_source']})" if peak else "peak RSS    not available")
    print(f"answers     {result['compared'] - len(result['mismatches'])} of {result['compared']} concurrent answers "
          "equal their sequential ones")
    for m in result["mismatches"]:
        print(f"  mismatch, client {m['client']} request {m['request']} ({m['prompt']!r}):\n"
              f"    concurrent {m['concurrent']!r}\n    sequential {m['sequential']!r}")
    for e in result["failed"]:
        print(f"  error, {e['phase']} client {e['client']} request {e['request']}: status {e['status']}: {e['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("-m", "--model", type=Path, help="artifact to serve (a server is started for the run)")
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--requests", type=int, default=5, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream", action="store_true", help="server-sent events instead of one JSON reply")
    parser.add_argument("--port", type=int, help="port for the started server (default: a free one)")
    parser.add_argument("--queue", type=int, help="the started server's --queue (default: the number of clients)")
    parser.add_argument("--profile", help="the started server's --profile (default: the server's)")
    parser.add_argument("--api-key", default=os.environ.get("EDGE_RUNTIME_API_KEY"),
                        help="for --url (default: $EDGE_RUNTIME_API_KEY)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one request may take, queueing included")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds the started server may take to load")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.max_tokens < 1:
        parser.error("--clients, --requests and --max-tokens must be at least 1")

    texts = prompts(args.clients * args.requests)
    work = [texts[c * args.requests:(c + 1) * args.requests] for c in range(args.clients)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            port = args.port or free_port()
            server = start_server(args.model, port, args.queue or args.clients, args.profile, Path(tmp) / "server.log",
                                  args.start_timeout)
            url = f"http://127.0.0.1:{port}"
        else:
            url = args.url.rstrip("/")
        try:
            with httpx.Client(base_url=url, headers=headers, timeout=args.timeout) as client:
                ask(client, "Hello!", args.max_tokens, args.stream)  # first-use costs stay out of the figures
            concurrent, concurrent_wall = run_concurrently(url, headers, work, args.max_tokens, args.stream,
                                                           args.timeout)
            sequential, sequential_wall = run_sequentially(url, headers, work, args.max_tokens, args.stream,
                                                           args.timeout)
            peak, source = peak_rss(url, headers, server.pid if server else None)
        finally:
            if server:
                stop_server(server)

    mismatches, failed, compared = [], [], 0
    for c, (mine, reference) in enumerate(zip(concurrent, sequential)):
        for r, (a, b) in enumerate(zip(mine, reference)):
            for phase, reply in (("concurrent", a), ("sequential", b)):
                if reply.status != 200 or reply.error:
                    failed.append({"phase": phase, "client": c, "request": r, "status": reply.status,
                                   "error": reply.error})
            if a.status == b.status == 200 and not (a.error or b.error):
                compared += 1
                if a.text != b.text:
                    mismatches.append({"client": c, "request": r, "prompt": work[c][r], "concurrent": a.text,
                                       "sequential": b.text})
    flat = [reply for replies in concurrent for reply in replies]
    result = {"url": url, "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
              "stream": args.stream, "concurrent": summary(flat, concurrent_wall),
              "sequential": summary([reply for replies in sequential for reply in replies], sequential_wall),
              "peak_rss_bytes": peak, "peak_rss_source": source, "compared": compared, "mismatches": mismatches,
              "failed": failed, "replies": [[asdict(reply) for reply in replies] for replies in concurrent]}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        report(result)
    return 1 if mismatches or failed else 0


if __name__ == "__main__":
    sys.exit(main())
