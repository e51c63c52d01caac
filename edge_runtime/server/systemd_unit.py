"""A systemd service unit that keeps `edge-runtime serve` running on a kiosk for months, unattended.

The unit is generated rather than shipped as a file because its two important numbers depend on the device and
the install: the memory ceiling is the profile's budget (the share of RAM `plan` checked the model against), and
ExecStart must name the absolute path of this install's `edge-runtime` script (a venv on the kiosk). Everything
that can be checked before systemd sees the file is checked here, so that a mistake is one line from
`edge-runtime service`, not a unit that fails to start at boot with the reason in the journal.

Choices the unit explains in its own comments (the admin reads it on the device): restarts that back off but never
give up, MemoryMax at the budget with MemoryHigh below it and no swap, a dynamic user and a read-only file system
except the cache directory (where the runtime keeps its SHA-256 stamps, so a restart does not re-hash the
artifact), and IP rules that let the server answer its clients but reach nothing else. Left out on purpose:
MemoryDenyWriteExecute (Python's ctypes callbacks may need writable code pages, and a kiosk that cannot start is
worse) and ProcSubset=pid (onnxruntime reads /proc/cpuinfo to choose its ARM kernels).
Needs systemd 247 (Debian 11, Raspberry Pi OS Bullseye); the restart back-off needs 254 and is left out before it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from edge_runtime.artifact import MANIFEST, read_manifest
from edge_runtime.device_profiles import PROFILE_DIR
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.profiles import Profile
from edge_runtime.server.listen_address import is_loopback

CACHE_DIRECTORY = "edge-runtime"  # under /var/cache: systemd creates it, owned by the service's user
# Private (RFC 1918, RFC 4193) and link-local networks: a LAN kiosk's clients, never the internet.
LAN_NETWORKS = ("localhost", "link-local", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
MEMORY_HIGH_SHARE = 0.9
RESTART_BACKOFF_SYSTEMD = 254  # RestartSteps= and RestartMaxDelaySec= appeared in systemd 254

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOST = re.compile(r"[A-Za-z0-9.-]+")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*|[0-9]+")


def render_unit(artifact: Path, profile: Profile, *, host: str = "127.0.0.1", port: int = 8080,
                user: str | None = None, executable: str | None = None,
                env_file: str = "/etc/edge-runtime/kiosk.env", systemd_version: int | None = None) -> str:
    """The text of a service unit running `edge-runtime serve -m ARTIFACT --host H --port P --profile PROFILE`.

    `user` runs the server as that account, else as a dynamic user (which can read only what others may read:
    checked here). `executable` defaults to the `edge-runtime` script of the running Python. `systemd_version`
    defaults to this machine's (`systemctl --version`): give the target's when rendering for another machine.
    Raises EdgeRuntimeError, one line, for anything systemd or the server would reject.
    """
    if not isinstance(profile, Profile):
        raise EdgeRuntimeError(f"profile must be a Profile (edge_runtime.load_profile), not {type(profile).__name__}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise EdgeRuntimeError(f"port {port!r}: choose a TCP port between 1 and 65535")
    artifact = Path(os.path.abspath(_no_control("artifact path", str(artifact))))
    manifest = read_manifest(artifact)
    bundled_profile = profile.path.resolve().parent == PROFILE_DIR.resolve()
    if user is None:
        model_files = [artifact / name for name in (MANIFEST, *manifest.files)]
        _check_readable_by_others(model_files if bundled_profile else [*model_files, profile.path])
    elif not _USER.fullmatch(user):
        raise EdgeRuntimeError(f"user {user!r}: not a user name or numeric UID")
    loopback = _is_loopback(host)
    if not env_file.startswith("/") or re.search(r"\s", env_file) or _CONTROL.search(env_file):
        raise EdgeRuntimeError(f"env file {env_file!r}: give an absolute path without spaces")
    exe = _executable(executable)
    version = systemd_version if systemd_version is not None else _systemd_version()
    profile_arg = profile.name if bundled_profile else str(profile.path.resolve())
    command = [exe, "serve", "-m", str(artifact), "--host", host, "--port", str(port), "--profile", profile_arg]
    title = _no_control("profile title", profile.title)
    memory_high = int(profile.budget_bytes * MEMORY_HIGH_SHARE)
    gib = 1 << 30

    lines = [
        "# edge-runtime: an OpenAI-compatible server for a kiosk, written by `edge-runtime service`.",
        f"# Profile {profile.name} ({title}); model {artifact}.",
        "# The API key, if the port is reachable from the network: EDGE_RUNTIME_API_KEY=... in",
        f"# {env_file} (root-owned, mode 600; systemd reads it, the server's user does not need to).",
        "",
        "[Unit]",
        f"Description=edge-runtime server ({_escape(title)})",
        *(["After=network.target"] if loopback else
          ["# Binding a LAN address needs the network configured first.",
           "Wants=network-online.target", "After=network-online.target"]),
        "# Never give up restarting: a kiosk nobody logs into must come back by itself (the default start limit",
        "# would leave it failed for good after a burst of crashes).",
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={' '.join(_quote(word) for word in command)}",
        f"EnvironmentFile=-{_escape(env_file)}",
        "# The runtime keeps its SHA-256 stamps here, so a restart does not re-hash the whole artifact.",
        f"Environment=EDGE_RUNTIME_CACHE=/var/cache/{CACHE_DIRECTORY}",
        f"CacheDirectory={CACHE_DIRECTORY}",
        "# Log lines reach the journal as they are written, not when a buffer fills.",
        "Environment=PYTHONUNBUFFERED=1",
        f"User={user}" if user else "DynamicUser=yes",
        "",
        *_restart_lines(version),
        "",
        (f"# Memory: the profile's budget, {profile.budget_bytes / gib:.2f} GiB ({profile.app_share:.0%} of "
         f"{profile.memory_bytes / gib:.1f} GiB), is the ceiling: past it the kernel kills"),
        "# the server (OOMPolicy=stop marks the unit failed, so it restarts) instead of the OS or the browser.",
        "# Above MemoryHigh the kernel first reclaims the service's clean pages (mapped PLE rows, cached weights).",
        "# No swap: every token reads all the weights, so swapped-out weights would turn seconds per reply into",
        "# minutes and wear out the SD card; a restart is the better recovery.",
        f"MemoryHigh={memory_high}",
        f"MemoryMax={profile.budget_bytes}",
        "MemorySwapMax=0",
        "OOMPolicy=stop",
        "",
        "# Sandbox: read-only system, no devices, no privileges, no new processes with more rights.",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "CapabilityBoundingSet=",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged",
        "SystemCallErrorNumber=EPERM",
        "UMask=0077",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "# No outbound network: the runtime never needs it, and a kiosk should not reach the internet.",
        *(["# Loopback only: the browser on this device is the only client.",
           "IPAddressDeny=any", "IPAddressAllow=localhost"] if loopback else
          ["# Clients on the LAN: loopback, link-local and private networks (RFC 1918, RFC 4193) only.",
           "IPAddressDeny=any", f"IPAddressAllow={' '.join(LAN_NETWORKS)}"]),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def _restart_lines(systemd_version: int | None) -> list[str]:
    """Restart 5 s after a crash or an OOM kill, with a pause growing to 2 minutes where systemd can grow it."""
    if systemd_version is not None and systemd_version >= RESTART_BACKOFF_SYSTEMD:
        return ["# A crash or an OOM kill restarts the server 5 s later; in a crash loop the pause grows to 2 minutes",
                "# (it counts the restarts since the last manual start or reset-failed).",
                "Restart=on-failure", "RestartSec=5s", "RestartSteps=5", "RestartMaxDelaySec=2min"]
    return ["# A crash or an OOM kill restarts the server 5 s later; loading the model paces a crash loop further",
            f"# (systemd {systemd_version or 'here'} cannot grow the pause: RestartSteps= needs {RESTART_BACKOFF_SYSTEMD}).",
            "Restart=on-failure", "RestartSec=5s"]


def _no_control(what: str, value: str) -> str:
    """A newline in a value would end the unit's line and start a new setting in it."""
    if _CONTROL.search(value):
        raise EdgeRuntimeError(f"{what} {value!r}: contains a control character")
    return value


def _escape(value: str) -> str:
    """systemd expands %-specifiers in most settings' values."""
    return value.replace("%", "%%")


def _quote(word: str) -> str:
    """One ExecStart word as systemd splits them: double quotes around anything with spaces or quotes, with C
    escapes for backslashes and quotes inside."""
    word = _escape(_no_control("command word", word)).replace("$", "$$")  # ExecStart also expands $VARIABLES
    if word and not re.search(r"[\s\"'\\;]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_loopback(host: str) -> bool:
    if not host or _CONTROL.search(host):
        raise EdgeRuntimeError(f"host {host!r}: give an IP address or a host name")
    if not is_loopback(host) and not _HOST.fullmatch(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise EdgeRuntimeError(f"host {host!r}: give an IP address or a host name") from None
    return is_loopback(host)


def _executable(executable: str | None) -> str:
    """The given path, else the `edge-runtime` script beside this Python (a venv's bin/), else the one on PATH."""
    if executable is None:
        beside = Path(sys.executable).parent / "edge-runtime"
        found = str(beside) if beside.is_file() else shutil.which("edge-runtime")
        if found is None:
            raise EdgeRuntimeError(f"no edge-runtime script beside {sys.executable} or on PATH; "
                                   "install edge-runtime into this environment or give its path")
        executable = found
    path = os.path.abspath(executable)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise EdgeRuntimeError(f"{path}: not an executable file; give the path of the edge-runtime script")
    return path


def _check_readable_by_others(files: list[Path]) -> None:
    """A dynamic user owns no file: it reaches the model only through the permissions granted to others."""
    for file in files:
        real = file.resolve()
        for directory in real.parents:
            if not directory.stat().st_mode & stat.S_IXOTH:
                raise EdgeRuntimeError(f"{directory}: other users cannot enter it, and the service runs as a dynamic "
                                       "user; chmod o+x it, move the files (e.g. to /opt/edge-runtime) or give a user")
        if not real.stat().st_mode & stat.S_IROTH:
            raise EdgeRuntimeError(f"{real}: other users cannot read it, and the service runs as a dynamic user; "
                                   f"chmod -R a+rX {real.parent} or give a user")


def _systemd_version() -> int | None:
    """This machine's systemd version, None when there is no systemctl (the unit then omits newer settings)."""
    exe = shutil.which("systemctl")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.match(r"systemd (\d+)", out)
    return int(found.group(1)) if found else None
