"""The CLI's relaunch with glibc's huge-page tunable: when it happens, what environment it starts with, and what the
bench reports of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from edge_runtime import huge_pages
from edge_runtime.huge_pages import OPT_OUT, RELAUNCHED, SETTING, launch_environment, thp_mode, why_not

GLIBC = (2, 36)


def test_the_kernels_mode_is_the_bracketed_word(tmp_path):
    for text, mode in (("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"),
                       ("always madvise [never]\n", "never"), ("", None)):
        (tmp_path / "enabled").write_text(text)
        assert thp_mode(tmp_path / "enabled") == mode
    assert thp_mode(tmp_path / "absent") is None  # a kernel built without transparent huge pages


def test_the_relaunch_adds_the_tunable_to_the_users_own():
    assert launch_environment({"PATH": "/bin"}, "madvise", GLIBC) == {"PATH": "/bin", "GLIBC_TUNABLES": SETTING,
                                                                       RELAUNCHED: "1"}
    assert launch_environment({"GLIBC_TUNABLES": "glibc.malloc.check=3"}, "always", GLIBC) == {
        "GLIBC_TUNABLES": f"glibc.malloc.check=3:{SETTING}", RELAUNCHED: "1"}


def test_no_relaunch_where_it_cannot_help_or_was_already_made():
    started = {"GLIBC_TUNABLES": f"glibc.malloc.check=3:{SETTING}"}
    assert launch_environment(started, "madvise", GLIBC) is None  # the relaunched process itself
    assert launch_environment({RELAUNCHED: "1"}, "madvise", GLIBC) is None  # ... whose loader dropped the tunable
    assert launch_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"}, "madvise", GLIBC) is None  # the user's
    assert launch_environment({OPT_OUT: "0"}, "madvise", GLIBC) is None
    assert launch_environment({}, "never", GLIBC) is None
    assert launch_environment({}, None, GLIBC) is None
    assert launch_environment({}, "madvise", None) is None  # musl, bionic
    assert launch_environment({}, "madvise", (2, 31)) is None
    assert why_not({}, "madvise", (2, 31)) == "glibc 2.31 has no glibc.malloc.hugetlb (2.35 and later have)"
    assert why_not({}, "never", GLIBC) == "the kernel offers no transparent huge pages (mode never)"
    assert why_not({}, "madvise", None) == "the C library is not glibc"


def bench(path, env: dict[str, str]) -> dict:
    result = subprocess.run([sys.executable, "-m", "edge_runtime", "bench", "-m", str(path), "-p", "0", "-n", "2",
                             "-r", "1", "--probe-mb", "8", "--json"], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_cli_starts_model_loading_commands_again_with_the_tunable(bundled):
    """On this machine's kernel and C library, bench runs in a process started with the tunable (or says why not);
    with the opt-out, or a tunable of the user's own, it runs as started."""
    path, env = bundled
    plain = {k: v for k, v in {**os.environ, **env}.items() if k not in ("GLIBC_TUNABLES", OPT_OUT, RELAUNCHED)}
    reason = why_not(plain, thp_mode(), huge_pages.glibc_version())
    expected = (f"huge pages: off ({reason})" if reason else
                f"huge pages: on ({SETTING}, transparent huge pages {thp_mode()})")
    assert bench(path, plain)["huge_pages"] == expected
    assert bench(path, {**plain, OPT_OUT: "0"})["huge_pages"] == f"huge pages: off ({OPT_OUT}=0)"
    own = bench(path, {**plain, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["huge_pages"]
    assert own == "huge pages: off (GLIBC_TUNABLES sets glibc.malloc.hugetlb=0)"  # the user's choice, kept


def test_glibc_is_told_by_its_version_string(monkeypatch):
    monkeypatch.setattr(os, "confstr", lambda name: "glibc 2.35")
    assert huge_pages.glibc_version() == (2, 35)

    def unknown(name: str) -> str:
        raise ValueError("unrecognized configuration name")  # musl, macOS: no such name

    monkeypatch.setattr(os, "confstr", unknown)
    assert huge_pages.glibc_version() is None
    monkeypatch.delattr(os, "confstr")  # Windows
    assert huge_pages.glibc_version() is None
