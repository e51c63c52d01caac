"""`edge-runtime serve` as a kiosk runs it: a process of its own, watched for any network access of its own.

Python's audit hooks see every socket connect and name lookup the process makes, whichever library makes
it, so "no outbound network" is checked on the real server serving real requests, not assumed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx

from conftest import serving

AUDITED = """
import sys
log = open(sys.argv.pop(1), "a", buffering=1)
def hook(event, args):
    if event in ("socket.bind", "socket.connect", "socket.sendto"):
        log.write(f"{event} {args[1]!r}\\n")
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "urllib.Request"):
        log.write(f"{event} {args[0]!r}\\n")
sys.addaudithook(hook)
sys.argv[0] = "edge-runtime"
from edge_runtime.cli import main
main()
"""
LOOPBACK = ("'127.0.0.1'", "('127.0.0.1',", "'localhost'", "'::1'")


def test_serve_answers_and_makes_no_network_access_of_its_own(bundled, tmp_path):
    log, stderr = tmp_path / "audit.log", tmp_path / "stderr.txt"
    options = ("--profile", "none", "--api-key", "k", "--log-level", "warning")
    with serving(bundled, stderr, *options, launcher=("-c", AUDITED, str(log))) as (process, url):
        auth = {"Authorization": "Bearer k"}
        assert "<html" in httpx.get(f"{url}/").text.lower()
        assert httpx.get(f"{url}/static/kiosk.css").status_code == 200
        chat = {"messages": [{"role": "user", "content": "Tell me about the sea"}], "max_tokens": 6, "stream": True}
        streamed = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=auth, timeout=60)
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
        plain = httpx.post(f"{url}/v1/completions", json={"prompt": "The sea", "max_tokens": 4, "temperature": 0}, headers=auth,
                           timeout=60)
        assert plain.json()["usage"]["completion_tokens"] == 4
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"}).status_code == 401
        metrics = httpx.get(f"{url}/metrics", headers=auth).text
        assert 'edge_runtime_requests_total{endpoint="/v1/completions",status="401"} 1.0' in metrics
        assert "edge_runtime_peak_resident_memory_bytes" in metrics
    events = log.read_text().splitlines()
    outbound = [e for e in events if not any(host in e for host in LOOPBACK)]
    assert outbound == [], f"the server reached for the network: {outbound}"
    assert f"socket.bind ('127.0.0.1', {url.rsplit(':', 1)[1]})" in events, f"the hook did not see the bind: {events}"
    output = stderr.read_text()
    assert process.returncode in (0, -15) and "Traceback" not in output, output  # uvicorn re-raises SIGTERM


def test_serve_names_a_port_in_use_before_loading(bundled, tmp_path):
    artifact, env = bundled
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "edge_runtime", "serve", "-m", str(artifact), "--port",
                                 str(port), "--profile", "none"], env={**os.environ, **env}, capture_output=True,
                                text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: cannot listen on 127.0.0.1:{port}: Address already in use; pick "
                                     "another --port or stop the program using it")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=60)


def test_service_writes_a_unit_with_the_profiles_memory_limit(artifacts, tmp_path):
    from edge_runtime.profiles import load_profile

    unit = tmp_path / "kiosk.service"
    result = _cli("service", "-m", str(artifacts["shared-gqa"]), "--profile", "pi4-4gb", "--user", "kiosk", "-o",
                  str(unit))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == f"wrote {unit}; then: systemctl daemon-reload && systemctl enable --now kiosk"
    lines = unit.read_text().splitlines()
    assert f"MemoryMax={load_profile('pi4-4gb').budget_bytes}" in lines and "Restart=on-failure" in lines
    assert "User=kiosk" in lines
    assert [p.name for p in tmp_path.iterdir()] == ["kiosk.service"]
    printed = _cli("service", "-m", str(artifacts["shared-gqa"]), "--profile", "pi4-4gb", "--user", "kiosk")
    assert printed.stdout == unit.read_text()


def test_service_needs_a_profile(artifacts):
    result = _cli("service", "-m", str(artifacts["shared-gqa"]), "--profile", "none")
    assert result.returncode == 1
    assert result.stderr.startswith("error: service needs a device profile: its memory share becomes the unit's")
