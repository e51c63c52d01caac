"""Fake device roots (device tree, /proc/cpuinfo, /proc/meminfo, Android properties) for `profiles detect`.

Under qemu-user the guest would read the host's own /proc (an x86 cpuinfo), so detection is checked against these
roots instead, on aarch64 by the check and on x86 by tests/test_arm64_check.py. The texts follow what these
devices print (64-bit Raspberry Pi OS Bookworm on a Pi 4 Model B 4 GB and a Pi 5 8 GB; a Galaxy S23, Snapdragon 8
Gen 2, whose kernel does not expose SVE); only the fields detection reads matter, the rest keeps them honest.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path


def _cpuinfo(features: str, parts: list[str], tail: str = "") -> str:
    cores = [f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
             f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 3\n"
             for i, part in enumerate(parts)]
    return "\n".join(cores) + ("\n" + tail if tail else "")


@dataclass(frozen=True)
class FakeDevice:
    name: str
    expected_profile: str
    model: str | None  # /proc/device-tree/model
    mem_kb: int
    cpuinfo: str
    properties: dict[str, str]  # Android system properties (getprop)

    def write(self, root: Path) -> Path:
        """The device's files under `root`, and a `getprop` program in root/bin when it is an Android device."""
        proc = root / "proc"
        proc.mkdir(parents=True, exist_ok=True)
        if self.model:
            (proc / "device-tree").mkdir(exist_ok=True)
            (proc / "device-tree" / "model").write_bytes(self.model.encode() + b"\0")
        (proc / "meminfo").write_text(f"MemTotal:       {self.mem_kb} kB\nMemFree:        {self.mem_kb // 2} kB\n")
        (proc / "cpuinfo").write_text(self.cpuinfo)
        if self.properties:
            (root / "bin").mkdir(exist_ok=True)
            getprop = root / "bin" / "getprop"
            lines = "\n".join(f'  {key}) echo "{value}" ;;' for key, value in self.properties.items())
            getprop.write_text(f'#!/bin/sh\ncase "$1" in\n{lines}\nesac\n')
            getprop.chmod(getprop.stat().st_mode | stat.S_IXUSR)
        return root


PI4_FEATURES = "fp asimd evtstrm crc32 cpuid"
PI5_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
SD8G2_FEATURES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
                  "dcpop sha3 sm3 sm4 asimddp sha512 asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg dcpodp flagm2 "
                  "frint i8mm bf16 bti")
DEVICES = [
    FakeDevice("Raspberry Pi 4 Model B 4 GB", "pi4-4gb", "Raspberry Pi 4 Model B Rev 1.4", 3_882_056,
               _cpuinfo(PI4_FEATURES, ["0xd08"] * 4,
                        "Revision\t: c03114\nSerial\t\t: 10000000a1b2c3d4\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"),
               {}),
    FakeDevice("Raspberry Pi 5 8 GB", "pi5-8gb", "Raspberry Pi 5 Model B Rev 1.0", 8_245_328,
               _cpuinfo(PI5_FEATURES, ["0xd0b"] * 4,
                        "Revision\t: d04170\nSerial\t\t: a1b2c3d4e5f60718\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"),
               {}),
    FakeDevice("Galaxy S23 (Snapdragon 8 Gen 2)", "android-8gb", None, 7_497_020,
               _cpuinfo(SD8G2_FEATURES, ["0xd46"] * 3 + ["0xd4d"] * 2 + ["0xd47"] * 2 + ["0xd4e"]),
               {"ro.product.manufacturer": "samsung", "ro.product.model": "SM-S911B", "ro.soc.model": "SM8550"}),
]


def detect_all(base: Path) -> list[tuple[str, str, str, bool]]:
    """(device, expected profile, detected profile, exact) for every fake device, each in its own root under `base`.

    Android's properties come from the fake `getprop` program through the runtime's own getprop reader."""
    from edge_runtime import profiles

    rows = []
    for i, device in enumerate(DEVICES):
        root = device.write(base / f"device{i}")
        getprop = None
        if device.properties:
            os.environ["PATH"] = f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
            getprop = profiles._system_getprop
        found = profiles.detect_profile(root, getprop=getprop or (lambda _prop: None))
        if device.properties:
            os.environ["PATH"] = os.environ["PATH"].split(os.pathsep, 1)[1]
        rows.append((device.name, device.expected_profile, found.profile.name, found.exact))
    return rows
