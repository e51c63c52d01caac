"""Device profiles: every bundled TOML validates, broken custom files fail with one line naming the file and key,
and detection picks the right class from fake device roots (device tree, /proc, Android properties)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.kv_formats import kv_format
from edge_runtime.profiles import (
    Profile,
    detect_profile,
    format_profile,
    format_profile_table,
    list_profiles,
    load_profile,
    profile_names,
    resolve_profile,
)

NAMES = ["android-12gb", "android-6gb", "android-8gb", "iphone-8gb", "pi-zero-2w", "pi4-2gb", "pi4-4gb", "pi4-8gb",
         "pi5-16gb", "pi5-4gb", "pi5-8gb", "x86_64-dev"]
ARM_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop"


def test_bundled_profiles_load_and_validate() -> None:
    assert profile_names() == NAMES
    profiles = list_profiles()
    assert [p.name for p in profiles] == NAMES
    for p in profiles:
        assert p.path.stem == p.name
        assert 0 < p.budget_bytes < p.memory_bytes
        assert 1 <= p.threads <= p.cores
        kv_format(p.kv)
        json.dumps(p.to_dict())
    pi5 = load_profile("pi5-8gb")
    assert (pi5.memory_bytes, pi5.arch, pi5.cpu_features) == (8192 << 20, "aarch64", ("neon", "dotprod"))
    assert pi5.budget_bytes == int(8192 * 2**20 * pi5.app_share)
    # phones leave most of their memory to the OS (Android's low-memory killer, iOS jetsam)
    assert all(p.app_share <= 0.5 for p in profiles if p.name.startswith(("android", "iphone")))


def test_profile_by_path_and_resolve(tmp_path: Path) -> None:
    bundled = load_profile("pi4-4gb")
    assert load_profile(bundled.path) == bundled
    assert resolve_profile(bundled) is bundled
    assert resolve_profile("pi4-4gb") == bundled
    custom = tmp_path / "my-board.toml"
    custom.write_text(bundled.path.read_text().replace('name = "pi4-4gb"', 'name = "my board"'))
    assert load_profile(str(custom)).name == "my board"  # custom files may name themselves freely


def test_unknown_profile_message() -> None:
    with pytest.raises(EdgeRuntimeError) as e:
        load_profile("pi6")
    assert str(e.value) == (f"unknown profile 'pi6': choose one of {', '.join(NAMES)} (see edge-runtime profiles list)")


@pytest.mark.parametrize(("edit", "message"), [
    (('kv = "tq3.5"', 'kv = "tq9"'), "[defaults] kv = 'tq9': not a KV cache format; choose one of fp32, fp16"),
    (('kv = "tq3.5"\n', ""), "[defaults] kv is missing; add it"),
    (("context = 8192", "contxt = 8192"), "[defaults] contxt: unknown key; expected one of weights"),
    (("context = 8192", 'context = "8k"'), "[defaults] context = '8k': expected an integer"),
    (("context = 8192", "context = 0"), "[defaults] context = 0: must be a positive number of tokens"),
    (('weights = "int4"', 'weights = "int3"'),
     "[defaults] weights = 'int3': not available; choose one of fp32, fp16, int8, int4, int8-block or a named recipe (int4-mixed)"),
    (('weights = "int4"', 'weights = "int4,oproj=int8"'),
     "[defaults] weights = 'int4,oproj=int8': unknown role 'oproj'; roles: qkv, o_proj, gate_up, down_proj, per_layer"),
    (("block_size = 128", "block_size = 256"), "[defaults] block_size = 256: choose one of 32, 64, 128"),
    (('ple = "int4"', 'ple = "int2"'), "[defaults] ple = 'int2': choose auto or one of fp32, bf16"),
    (("app_share = 0.75", "app_share = 1.5"), "[memory] app_share = 1.5: must be a share of memory in (0, 1]"),
    (("threads = 4", "threads = 0"), "[cpu] threads = 0: must be between 1 and cores (4)"),
    (('"neon"', '"neon", "sme"'), "[cpu] features = ['neon', 'sme']: unknown ['sme']"),
    (("[storage]", "storage ="), "not valid TOML: "),
    (("sustained_gb_s = 4.8", "sustained_gb_s = 20"),
     "[memory] sustained_gb_s = 20: must be positive and at most peak_gb_s (12.8)"),
    (("clock_ghz = 1.8", "clock_ghz = 0"), "[cpu] clock_ghz = 0: must be positive"),
    (("int8_macs_per_cycle = 8", "int8_macs_per_cycle = 8.5"), "[cpu] int8_macs_per_cycle = 8.5: expected an integer"),
    (("peak_gb_s = 12.8", 'peak_gb_s = "fast"'), "[memory] peak_gb_s = 'fast': expected a number"),
])
def test_broken_custom_profile(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    text = load_profile("pi4-4gb").path.read_text()
    assert edit[0] in text
    path = tmp_path / "foo.toml"
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(EdgeRuntimeError) as e:
        load_profile(path)
    assert str(e.value).startswith(f"{path}: {message}")
    assert "\n" not in str(e.value)


def test_sustained_bandwidth_is_optional(tmp_path: Path) -> None:
    text = load_profile("pi4-4gb").path.read_text()
    path = tmp_path / "no-measurement.toml"
    path.write_text(text.replace("sustained_gb_s = 4.8\n", ""))
    profile = load_profile(path)
    assert (profile.peak_gb_s, profile.sustained_gb_s) == (12.8, None)
    assert "12.8 GB/s peak, no published sustained read figure" in format_profile(profile)


def test_bundled_name_must_match_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_runtime import profiles

    (tmp_path / "foo.toml").write_text(load_profile("pi4-4gb").path.read_text())
    monkeypatch.setattr(profiles, "PROFILE_DIR", tmp_path)
    with pytest.raises(EdgeRuntimeError, match=r"foo.toml: name = 'pi4-4gb': must equal the file name 'foo'"):
        load_profile("foo")


def fake_root(tmp_path: Path, model: str | None, mem_mb: int | None, cpuinfo: str | None) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir(parents=True)
    if model is not None:
        (proc / "device-tree").mkdir()
        (proc / "device-tree" / "model").write_bytes(model.encode() + b"\0")
    if mem_mb is not None:
        (proc / "meminfo").write_text(f"MemTotal:       {mem_mb * 1024} kB\nMemFree:        1000 kB\n")
    if cpuinfo is not None:
        (proc / "cpuinfo").write_text(cpuinfo)
    return tmp_path


def arm_cpuinfo(extra: str = "") -> str:
    return "".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {ARM_FEATURES} {extra}\n\n" for i in range(4))


def test_detect_pi5_8gb(tmp_path: Path) -> None:
    found = detect_profile(fake_root(tmp_path, "Raspberry Pi 5 Model B Rev 1.0", 8062, arm_cpuinfo("asimddp")))
    assert (found.profile.name, found.exact) == ("pi5-8gb", True)
    assert found.reasons[:3] == ["device-tree model: Raspberry Pi 5 Model B Rev 1.0", "MemTotal 8062 MB",
                                 "cpu: aarch64, features: neon dotprod"]
    assert json.loads(json.dumps(found.to_dict()))["profile"]["name"] == "pi5-8gb"


def test_detect_pi4_by_memory(tmp_path: Path) -> None:
    found = detect_profile(fake_root(tmp_path, "Raspberry Pi 4 Model B Rev 1.4", 3844, arm_cpuinfo()))
    assert (found.profile.name, found.exact) == ("pi4-4gb", True)


def test_detect_pi5_2gb_takes_nearest_class(tmp_path: Path) -> None:
    found = detect_profile(fake_root(tmp_path, "Raspberry Pi 5 Model B Rev 1.1", 2002, arm_cpuinfo("asimddp")))
    assert (found.profile.name, found.exact) == ("pi5-4gb", False)
    assert found.reasons[-1] == "no class of 2002 MB: chose the nearest, pi5-4gb"


def test_detect_pi_zero_2w(tmp_path: Path) -> None:
    found = detect_profile(fake_root(tmp_path, "Raspberry Pi Zero 2 W Rev 1.0", 427, arm_cpuinfo()))
    assert (found.profile.name, found.exact) == ("pi-zero-2w", True)


def test_detect_x86(tmp_path: Path) -> None:
    flags = "flags\t\t: fpu vme de pse tsc msr pae mce sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma\n"
    found = detect_profile(fake_root(tmp_path, None, 15_900, f"processor\t: 0\n{flags}\nprocessor\t: 1\n{flags}"))
    assert (found.profile.name, found.exact) == ("x86_64-dev", True)
    assert "cpu: x86_64, features: avx2" in found.reasons
    big = detect_profile(fake_root(tmp_path / "big", None, 64_000, flags + flags.replace("fma", "avx512f")))
    assert (big.profile.name, big.exact) == ("x86_64-dev", False)


def test_detect_android(tmp_path: Path) -> None:
    props = {"ro.product.model": "SM-S911B", "ro.product.manufacturer": "samsung", "ro.soc.model": "SM8550"}
    found = detect_profile(fake_root(tmp_path, None, 7_500, arm_cpuinfo("asimddp i8mm")), getprop=props.get)
    assert (found.profile.name, found.exact) == ("android-8gb", True)
    assert found.reasons[0] == "Android: samsung SM-S911B (SM8550)"


def test_detect_unknown_arm_board(tmp_path: Path) -> None:
    found = detect_profile(fake_root(tmp_path, "Radxa ROCK 5B", 15_700, arm_cpuinfo("asimddp")))
    assert (found.profile.name, found.exact) == ("pi5-16gb", False)


def test_detect_empty_root_falls_back(tmp_path: Path) -> None:
    found = detect_profile(tmp_path)
    assert (found.profile.name, found.exact) == ("pi4-4gb", False)
    assert found.reasons[0] == "no MemTotal in /proc/meminfo: memory unknown"
    assert found.reasons[1] == "no CPU features in /proc/cpuinfo: architecture unknown"
    assert found.reasons[2].startswith("nothing identified the device: assumed pi4-4gb")


def test_formatters() -> None:
    p = load_profile("pi5-8gb")
    text = format_profile(p)
    assert text.splitlines()[0] == "pi5-8gb: Raspberry Pi 5, 8 GB"
    assert "8.0 GiB, budget 6.0 GiB (75% for this runtime)" in text
    assert "neon dotprod" in text and "context 32768" in text
    assert "17.07 GB/s peak, 11.6 GB/s sustained read" in text and "2.4 GHz, 32 int8 MACs/cycle per core" in text
    table = format_profile_table(list_profiles()).splitlines()
    assert len(table) == len(NAMES) + 1 and table[0].startswith("name")
    assert any(line.startswith("pi4-2gb") and "int4 b128" in line and "2048" in line for line in table)
    assert isinstance(p, Profile)
