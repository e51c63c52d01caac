"""The kiosk's systemd unit: memory limits from real profiles, restarts, IP rules, ExecStart quoting, input errors,
and systemd's own `systemd-analyze verify` on the rendered file."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.profiles import load_profile
from edge_runtime.server.systemd_unit import render_unit

PI4 = load_profile("pi4-4gb")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value given (systemd keys such as SystemCallFilter may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def exec_words(unit: dict[str, dict[str, list[str]]]) -> list[str]:
    """ExecStart split and unquoted as systemd does for the escapes render_unit writes (\\\\ and \\" in double
    quotes), with its %% and $$ turned back into % and $."""
    [line] = unit["Service"]["ExecStart"]
    return [word.replace("%%", "%").replace("$$", "$") for word in shlex.split(line)]


def make_public(path: Path) -> Path:
    """What a dynamic user can read: every directory open to others, every file readable."""
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(Path(root) / name, 0o644)
    return path


@pytest.fixture(scope="module")
def public_dir():
    """A directory under /tmp open to other users (pytest's own tmp directories are private to the user)."""
    path = Path(tempfile.mkdtemp(prefix="edge-runtime-unit-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def artifact(artifacts, public_dir) -> Path:
    return make_public(Path(shutil.copytree(artifacts["shared-gqa"], public_dir / "model.art")))


@pytest.fixture(scope="module")
def executable(public_dir) -> str:
    """A stand-in for the edge-runtime script in a directory with a space: systemd checks that it exists."""
    path = public_dir / "venv bin" / "edge-runtime"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def render(artifact: Path, executable: str, **kwargs) -> dict[str, dict[str, list[str]]]:
    return parse_unit(render_unit(artifact, kwargs.pop("profile", PI4), executable=executable, **kwargs))


@pytest.mark.parametrize("name", ["pi4-4gb", "pi5-8gb", "pi-zero-2w", "android-8gb", "x86_64-dev"])
def test_memory_limits_are_the_profiles_budget(artifact, executable, name):
    profile = load_profile(name)
    service = render(artifact, executable, profile=profile)["Service"]
    assert service["MemoryMax"] == [str(profile.budget_bytes)]
    high = int(service["MemoryHigh"][0])
    assert 0.8 * profile.budget_bytes < high < profile.budget_bytes
    assert service["MemorySwapMax"] == ["0"]
    assert service["OOMPolicy"] == ["stop"]
    assert exec_words({"Service": service})[-2:] == ["--profile", name]


def test_a_custom_profile_is_passed_by_its_path(artifact, executable, tmp_path, public_dir):
    private = tmp_path / "kiosk.toml"
    private.write_text(PI4.path.read_text())
    with pytest.raises(EdgeRuntimeError, match="other users cannot enter it"):  # pytest's tmp_path is private
        render_unit(artifact, load_profile(private), executable=executable)
    words = exec_words(render(artifact, executable, profile=load_profile(private), user="kiosk"))
    assert words[-2:] == ["--profile", str(private.resolve())]
    public = Path(shutil.copy(private, public_dir / "kiosk.toml"))
    public.chmod(0o644)
    assert exec_words(render(artifact, executable, profile=load_profile(public)))[-1] == str(public)


def test_restarts_back_off_and_never_give_up(artifact, executable):
    old = render(artifact, executable, systemd_version=252)
    assert old["Unit"]["StartLimitIntervalSec"] == ["0"]
    assert old["Service"]["Restart"] == ["on-failure"]
    assert old["Service"]["RestartSec"] == ["5s"]
    assert "RestartSteps" not in old["Service"]  # unknown before systemd 254: it would be a warning at every load
    new = render(artifact, executable, systemd_version=254)["Service"]
    assert new["RestartSteps"] == ["5"] and new["RestartMaxDelaySec"] == ["2min"]


def test_service_environment_and_sandbox(artifact, executable):
    unit = render(artifact, executable)
    service = unit["Service"]
    assert service["EnvironmentFile"] == ["-/etc/edge-runtime/kiosk.env"]
    assert "EDGE_RUNTIME_CACHE=/var/cache/edge-runtime" in service["Environment"]
    assert service["CacheDirectory"] == ["edge-runtime"]
    assert service["DynamicUser"] == ["yes"] and "User" not in service
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "read-only"),
                       ("PrivateTmp", "yes"), ("PrivateDevices", "yes"),
                       ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX")]:
        assert service[key] == [value], key
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    named = render(artifact, executable, user="kiosk", env_file="/etc/kiosk/api.env")["Service"]
    assert named["User"] == ["kiosk"] and "DynamicUser" not in named
    assert named["EnvironmentFile"] == ["-/etc/kiosk/api.env"]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "::1", "localhost"])
def test_loopback_host_reaches_only_loopback(artifact, executable, host):
    unit = render(artifact, executable, host=host, port=9000)
    assert unit["Service"]["IPAddressDeny"] == ["any"]
    assert unit["Service"]["IPAddressAllow"] == ["localhost"]
    assert unit["Unit"]["After"] == ["network.target"]
    assert exec_words(unit)[4:8] == ["--host", host, "--port", "9000"]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "kiosk.local"])
def test_lan_host_reaches_only_private_networks(artifact, executable, host):
    unit = render(artifact, executable, host=host)
    assert unit["Service"]["IPAddressDeny"] == ["any"]
    allowed = unit["Service"]["IPAddressAllow"][0].split()
    assert {"localhost", "link-local", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"} == set(allowed)
    assert unit["Unit"]["After"] == ["network-online.target"]


def test_exec_start_quotes_paths_with_spaces_and_specials(artifact, executable, public_dir):
    odd = make_public(Path(shutil.copytree(artifact, public_dir / 'kiosk model 50% $HOME "q" \\x')))
    words = exec_words(render(odd, executable))
    assert words == [executable, "serve", "-m", str(odd), "--host", "127.0.0.1", "--port", "8080",
                     "--profile", "pi4-4gb"]


def test_profile_title_cannot_inject_settings(artifact, executable):
    unit = render(artifact, executable, profile=dataclasses.replace(PI4, title="Kiosk, 50% of RAM"))
    assert unit["Unit"]["Description"] == ["edge-runtime server (Kiosk, 50%% of RAM)"]  # % starts a specifier
    with pytest.raises(EdgeRuntimeError, match="profile title .*control character"):
        render_unit(artifact, dataclasses.replace(PI4, title="Kiosk\nExecStartPre=/bin/rm"), executable=executable)


def test_relative_artifact_becomes_absolute(artifact, executable, monkeypatch):
    monkeypatch.chdir(artifact.parent)
    assert exec_words(render(Path(artifact.name), executable))[3] == str(artifact)


def test_default_executable_is_the_script_beside_python(artifact, public_dir, monkeypatch):
    bin_dir = public_dir / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "edge-runtime"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    assert exec_words(parse_unit(render_unit(artifact, PI4)))[0] == str(script)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(port=0), "port 0: choose a TCP port between 1 and 65535"),
    (dict(port=65536), "port 65536"),
    (dict(port=True), "port True"),
    (dict(host="my host"), "host 'my host': give an IP address or a host name"),
    (dict(host=""), "host ''"),
    (dict(host="x\nExecStartPre=/bin/rm"), "host"),
    (dict(user="kiosk user"), "user 'kiosk user': not a user name"),
    (dict(env_file="kiosk.env"), "give an absolute path without spaces"),
    (dict(executable="/nonexistent/edge-runtime"), "/nonexistent/edge-runtime: not an executable file"),
])
def test_bad_input_is_one_line(artifact, executable, kwargs, message):
    with pytest.raises(EdgeRuntimeError, match=message.replace("(", r"\(")) as caught:
        render_unit(artifact, PI4, **{"executable": executable, **kwargs})
    assert "\n" not in str(caught.value)


def test_bad_artifacts(artifacts, executable, tmp_path):
    with pytest.raises(EdgeRuntimeError, match="no such artifact directory"):
        render_unit(tmp_path / "missing", PI4, executable=executable, user="kiosk")
    with pytest.raises(EdgeRuntimeError, match="no manifest.json"):
        render_unit(tmp_path, PI4, executable=executable, user="kiosk")
    with pytest.raises(EdgeRuntimeError, match="control character"):
        render_unit(tmp_path / "a\nb", PI4, executable=executable, user="kiosk")
    with pytest.raises(EdgeRuntimeError, match="Profile"):
        render_unit(artifacts["shared-gqa"], "pi4-4gb", executable=executable, user="kiosk")


def test_dynamic_user_needs_an_artifact_others_can_read(artifacts, artifact, executable, public_dir):
    # pytest's tmp directories are private to their user: a dynamic user could not reach the artifact.
    private = artifacts["shared-gqa"]
    with pytest.raises(EdgeRuntimeError, match="other users cannot enter it"):
        render_unit(private, PI4, executable=executable)
    assert render_unit(private, PI4, executable=executable, user="kiosk")
    unreadable = make_public(Path(shutil.copytree(artifact, public_dir / "unreadable.art")))
    (unreadable / "weights.bin").chmod(0o600)
    with pytest.raises(EdgeRuntimeError, match=r"weights\.bin: other users cannot read it"):
        render_unit(unreadable, PI4, executable=executable)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_systemd_analyze_verify_accepts_the_unit(artifact, executable, tmp_path, host):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "edge-runtime.service"
    unit.write_text(render_unit(artifact, PI4, executable=executable, host=host))  # this machine's systemd version
    run = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert unit.name not in run.stderr, run.stderr  # warnings (unknown keys, bad values) name the file
