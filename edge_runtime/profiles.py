"""Device profiles: what a class of device has (memory, cores, CPU features, storage speed) and the formats and
context that fit it, one TOML file per class in `device_profiles/`.

Profiles hold facts and defaults, not code, so that a new board is a new file (`load_profile("my.toml")`), and
every file is checked against the formats this runtime implements when it is read: a profile that names a
format export cannot write fails here, with the file and key, rather than at load time on the device.
Detection reads only files under `root` (and the injected `getprop`) so that tests can fake a device.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_runtime.device_profiles import PROFILE_DIR
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.kv_formats import KV_FORMATS
from edge_runtime.ple_store import PLE_FORMATS
from edge_runtime.weight_formats import BLOCK_SIZES
from edge_runtime.weight_recipe import parse_recipe, weights_label

ARCHES = ("aarch64", "x86_64")  # the architectures onnxruntime publishes CPU wheels for
CPU_FEATURES = ("neon", "dotprod", "i8mm", "sve", "avx2", "avx512", "vnni")
# /proc/cpuinfo flag -> our feature name (ARM "Features" line, x86 "flags" line)
_CPUINFO_FLAGS = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "avx2": "avx2",
                  "avx512f": "avx512", "avx512_vnni": "vnni", "avx_vnni": "vnni"}
# The most conservative class that still runs E2B: assumed when nothing identifies the device.
FALLBACK = "pi4-4gb"
# MemTotal is below the nominal size (firmware, GPU and kernel reservations): a class fits exactly when the
# reported memory is at least this share of its nominal size.
_MEM_MATCH = 0.75

_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "": {"name": str, "title": str},
    "memory": {"total_mb": int, "app_share": (int, float), "peak_gb_s": (int, float), "sustained_gb_s": (int, float)},
    "cpu": {"arch": str, "cores": int, "threads": int, "features": list, "clock_ghz": (int, float),
            "int8_macs_per_cycle": int},
    "storage": {"read_mb_s": (int, float)},
    "defaults": {"weights": str, "block_size": int, "ple": str, "kv": str, "context": int},
}
# The cost model's facts are optional, so that a profile written only to plan memory keeps loading: without them
# `plan` and `profiles show` say there is no estimate. A sustained read bandwidth is a measurement, and not every
# device has a published one: the cost model then takes a share of the peak (edge_runtime/cost_model.py). The
# bundled profiles give all but that (tests/test_cost_model.py).
COST_FACTS = ("peak_gb_s", "clock_ghz", "int8_macs_per_cycle")
_OPTIONAL = {"sustained_gb_s", *COST_FACTS}
_TYPE_NAMES = {str: "a string", int: "an integer", (int, float): "a number", list: "a list"}


@dataclass(frozen=True)
class Profile:
    """One device class: its facts and the defaults (formats, context) that fit its memory."""

    name: str
    title: str
    memory_bytes: int
    app_share: float
    peak_gb_s: float | None
    sustained_gb_s: float | None
    arch: str
    cores: int
    threads: int
    cpu_features: tuple[str, ...]
    clock_ghz: float | None
    int8_macs_per_cycle: int | None
    storage_read_mb_s: float
    weights: str
    block_size: int
    ple: str
    kv: str
    context: int
    path: Path

    @property
    def budget_bytes(self) -> int:
        """Memory this runtime may use: the OS, and on phones the low-memory killer, need the rest."""
        return int(self.memory_bytes * self.app_share)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cpu_features": list(self.cpu_features), "path": str(self.path),
                "budget_bytes": self.budget_bytes}


@dataclass(frozen=True)
class Detection:
    """The profile chosen for this device, and the facts that led to it."""

    profile: Profile
    reasons: list[str]
    exact: bool

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.to_dict(), "reasons": list(self.reasons), "exact": self.exact}


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def list_profiles() -> list[Profile]:
    return [load_profile(name) for name in profile_names()]


def load_profile(name_or_path: str | Path) -> Profile:
    """A bundled profile by name, or a custom one from a .toml file."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text:
        path = Path(name_or_path)
        if not path.is_file():
            raise EdgeRuntimeError(f"{path}: no such profile file; give a .toml file or one of "
                                   f"{', '.join(profile_names())}")
        return _parse(path, bundled=path.resolve().parent == PROFILE_DIR.resolve())
    if text not in profile_names():
        raise EdgeRuntimeError(f"unknown profile {text!r}: choose one of {', '.join(profile_names())} "
                               "(see edge-runtime profiles list)")
    return _parse(PROFILE_DIR / f"{text}.toml", bundled=True)


def resolve_profile(profile: str | Path | Profile) -> Profile:
    """A Profile as given, "auto" for this device's detected one, or a name or .toml path to load."""
    if isinstance(profile, Profile):
        return profile
    return detect_profile().profile if profile == "auto" else load_profile(profile)


def _parse(path: Path, bundled: bool) -> Profile:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EdgeRuntimeError(f"{path}: not valid TOML: {e}; fix the file (see device_profiles/README.md)") from None
    tables = {"": {k: v for k, v in data.items() if not isinstance(v, dict)}}
    tables.update({k: v for k, v in data.items() if isinstance(v, dict)})
    label = {key: f"[{table}] {key}" if table else key for table, keys in _SCHEMA.items() for key in keys}
    for table, values in tables.items():
        if table not in _SCHEMA:
            raise EdgeRuntimeError(f"{path}: unknown table [{table}]; expected one of "
                                   f"{', '.join(f'[{t}]' for t in _SCHEMA if t)}")
        for key in values:
            if key not in _SCHEMA[table]:
                raise EdgeRuntimeError(f"{path}: {f'[{table}] ' if table else ''}{key}: unknown key; expected one of "
                                       f"{', '.join(_SCHEMA[table])}")
    v: dict[str, Any] = {}

    def check(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise EdgeRuntimeError(f"{path}: {label[key]} = {v[key]!r}: {what}")

    for table, keys in _SCHEMA.items():
        for key, kind in keys.items():
            if key not in tables.get(table, {}):
                if key in _OPTIONAL:
                    v[key] = None
                    continue
                raise EdgeRuntimeError(f"{path}: {label[key]} is missing; add it (see device_profiles/README.md)")
            v[key] = tables[table][key]
            check(key, isinstance(v[key], kind) and not isinstance(v[key], bool), f"expected {_TYPE_NAMES[kind]}")
    check("name", not bundled or v["name"] == path.stem, f"must equal the file name {path.stem!r}")
    check("total_mb", v["total_mb"] > 0, "must be positive")
    check("app_share", 0 < v["app_share"] <= 1, "must be a share of memory in (0, 1]")
    if v["peak_gb_s"] is not None:
        check("peak_gb_s", v["peak_gb_s"] > 0, "must be positive")
    if v["sustained_gb_s"] is not None:
        check("sustained_gb_s", v["peak_gb_s"] is not None and 0 < v["sustained_gb_s"] <= v["peak_gb_s"],
              f"must be positive and at most peak_gb_s ({v['peak_gb_s']})")
    check("arch", v["arch"] in ARCHES, f"choose one of {', '.join(ARCHES)}")
    check("cores", v["cores"] >= 1, "must be at least 1")
    check("threads", 1 <= v["threads"] <= v["cores"], f"must be between 1 and cores ({v['cores']})")
    unknown = [f for f in v["features"] if f not in CPU_FEATURES]
    check("features", not unknown, f"unknown {unknown}; choose from {', '.join(CPU_FEATURES)}")
    if v["clock_ghz"] is not None:
        check("clock_ghz", v["clock_ghz"] > 0, "must be positive")
    if v["int8_macs_per_cycle"] is not None:
        check("int8_macs_per_cycle", v["int8_macs_per_cycle"] >= 1, "must be at least 1")
    check("read_mb_s", v["read_mb_s"] > 0, "must be positive")
    check("block_size", v["block_size"] in BLOCK_SIZES, f"choose one of {', '.join(map(str, BLOCK_SIZES))}")
    try:
        parse_recipe(v["weights"], v["block_size"])
    except ValueError as exc:
        check("weights", False, str(exc))
    check("ple", v["ple"] in ("auto", *PLE_FORMATS), f"choose auto or one of {', '.join(PLE_FORMATS)}")
    check("kv", v["kv"] in KV_FORMATS, f"not a KV cache format; choose one of {', '.join(KV_FORMATS)}")
    check("context", v["context"] > 0, "must be a positive number of tokens")
    def number(key: str) -> float | None:
        return None if v[key] is None else float(v[key])

    return Profile(name=v["name"], title=v["title"], memory_bytes=v["total_mb"] << 20, app_share=float(v["app_share"]),
                   peak_gb_s=number("peak_gb_s"), sustained_gb_s=number("sustained_gb_s"),
                   arch=v["arch"], cores=v["cores"], threads=v["threads"], cpu_features=tuple(v["features"]),
                   clock_ghz=number("clock_ghz"), int8_macs_per_cycle=v["int8_macs_per_cycle"],
                   storage_read_mb_s=float(v["read_mb_s"]), weights=v["weights"], block_size=v["block_size"],
                   ple=v["ple"], kv=v["kv"], context=v["context"], path=path)


def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _system_getprop(prop: str) -> str | None:
    """Android's system property, or None off Android (no `getprop` binary) or when it does not answer."""
    exe = shutil.which("getprop")
    if exe is None:
        return None
    try:
        return subprocess.run([exe, prop], capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _by_memory(profiles: list[Profile], prefix: str, mem_mb: int | None) -> tuple[Profile, bool]:
    """Of the classes named `prefix`*, the smallest holding `mem_mb` (the largest when none does; the smallest when
    memory is unknown), and whether the reported memory matches that class's nominal size."""
    ordered = sorted((p for p in profiles if p.name.startswith(prefix)), key=lambda p: p.memory_bytes)
    if mem_mb is None:
        return ordered[0], False
    chosen = next((p for p in ordered if p.memory_bytes >> 20 >= mem_mb), ordered[-1])
    nominal = chosen.memory_bytes >> 20
    return chosen, _MEM_MATCH * nominal <= mem_mb <= nominal


def detect_profile(root: Path = Path("/"), getprop: Callable[[str], str | None] | None = None) -> Detection:
    """Pick the profile of the machine under `root` from the device tree, /proc and Android properties.

    `getprop` defaults to the system's only for the real root, since it describes the running system."""
    if getprop is None:
        getprop = _system_getprop if root == Path("/") else (lambda _prop: None)
    profiles = list_profiles()
    reasons: list[str] = []
    model = (_read(root, "proc/device-tree/model") or "").strip("\0\n ")
    if model:
        reasons.append(f"device-tree model: {model}")
    android = getprop("ro.product.model")
    if android:
        soc = getprop("ro.soc.model")
        name = " ".join(filter(None, [getprop("ro.product.manufacturer"), android]))
        reasons.append(f"Android: {name}" + (f" ({soc})" if soc else ""))

    found = re.search(r"^MemTotal:\s*(\d+)\s*kB", _read(root, "proc/meminfo") or "", re.MULTILINE)
    mem_mb = int(found.group(1)) // 1024 if found else None
    reasons.append(f"MemTotal {mem_mb} MB" if mem_mb else "no MemTotal in /proc/meminfo: memory unknown")

    cpuinfo = _read(root, "proc/cpuinfo") or ""
    flags = {f for line in re.findall(r"^(?:Features|flags)\s*:(.*)$", cpuinfo, re.MULTILINE) for f in line.split()}
    features = sorted({_CPUINFO_FLAGS[f] for f in flags if f in _CPUINFO_FLAGS}, key=CPU_FEATURES.index)
    arch = "x86_64" if re.search(r"^flags\s*:", cpuinfo, re.MULTILINE) else "aarch64" if "neon" in features else None
    reasons.append(f"cpu: {arch}, features: {' '.join(features) or 'none'}" if arch
                   else "no CPU features in /proc/cpuinfo: architecture unknown")

    family = re.match(r"Raspberry Pi (?:Compute Module )?([45])", model)
    if "Raspberry Pi Zero 2" in model:
        profile, exact = load_profile("pi-zero-2w"), True
    elif family:
        profile, exact = _by_memory(profiles, f"pi{family.group(1)}-", mem_mb)
    elif android:
        profile, exact = _by_memory(profiles, "android-", mem_mb)
    elif arch == "x86_64":
        profile, fits = _by_memory(profiles, "x86_64-dev", mem_mb)
        exact = fits and "avx2" in features
        if not exact:
            reasons.append("x86_64-dev stands for every x86_64 machine; this one differs in memory or AVX2")
    elif arch == "aarch64":
        # An unknown ARM board: the Pi family of its CPU class (dot-product or not), then by memory.
        pis = "pi5-" if "dotprod" in features else "pi4-"
        profile, exact = _by_memory(profiles, pis, mem_mb)[0], False
        reasons.append(f"unknown ARM board: the {pis[:-1]} class nearest in CPU features and memory")
    else:
        profile, exact = load_profile(FALLBACK), False
        reasons.append(f"nothing identified the device: assumed {FALLBACK}, the most conservative class that "
                       "runs E2B; choose a profile by name if this is wrong")
    if (family or android) and not exact:
        reasons.append(f"memory unknown: assumed the smallest class, {profile.name}" if mem_mb is None
                       else f"no class of {mem_mb} MB: chose the nearest, {profile.name}")
    return Detection(profile, reasons, exact)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _defaults(p: Profile) -> str:
    return f"weights {weights_label(p.weights, p.block_size)}, PLE {p.ple}, KV {p.kv}, context {p.context}"


def format_profile(p: Profile) -> str:
    """Multi-line description for `edge-runtime profiles show`."""
    return "\n".join([
        f"{p.name}: {p.title}",
        f"  memory    {_gib(p.memory_bytes)}, budget {_gib(p.budget_bytes)} ({p.app_share:.0%} for this runtime)",
        "  bandwidth " + ("not given" if p.peak_gb_s is None else f"{p.peak_gb_s:g} GB/s peak, " + (
            f"{p.sustained_gb_s:g} GB/s sustained read" if p.sustained_gb_s else "no published sustained read figure")),
        f"  cpu       {p.arch}, {p.cores} cores, {p.threads} threads"
        + ("" if p.clock_ghz is None else f", {p.clock_ghz:g} GHz")
        + ("" if p.int8_macs_per_cycle is None else f", {p.int8_macs_per_cycle} int8 MACs/cycle per core"),
        f"  features  {' '.join(p.cpu_features) or 'none'}",
        f"  storage   {p.storage_read_mb_s:g} MB/s read",
        f"  defaults  {_defaults(p)}",
        f"  file      {p.path}",
    ])


def format_profile_table(profiles: Iterable[Profile]) -> str:
    """One line per profile for `edge-runtime profiles list`."""
    rows = [("name", "title", "RAM", "budget", "defaults")]
    rows += [(p.name, p.title, _gib(p.memory_bytes), _gib(p.budget_bytes), _defaults(p)) for p in profiles]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:4], widths)), r[4]]).rstrip() for r in rows)
