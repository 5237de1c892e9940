"""`whetstone install-service` writes a systemd user unit that runs this install's
`whetstone up` for the home, and systemd itself accepts it where systemd-analyze exists."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli


def _directive(unit: str, key: str) -> str:
    (line,) = [line for line in unit.splitlines() if line.startswith(f"{key}=")]
    return line.split("=", 1)[1]


def test_install_service_writes_a_unit_that_starts_this_install(tmp_path: Path) -> None:
    home = tmp_path / "my home"  # a space: ExecStart must quote it
    units = tmp_path / "units"
    result = run_cli("install-service", "--home", str(home), "--unit-dir", str(units))
    assert result.returncode == 0, result.stderr
    assert "systemctl --user enable --now whetstone" in result.stdout
    assert "journalctl --user -u whetstone" in result.stdout
    unit = (units / "whetstone.service").read_text()
    argv = shlex.split(_directive(unit, "ExecStart"))
    assert Path(argv[0]).is_file() and os.access(argv[0], os.X_OK), argv
    assert argv[1:] == ["up", "--home", str(home.resolve())]
    # The shutdown bound: the daemon's stop timeout (60 s default) plus the worker's.
    assert int(_directive(unit, "TimeoutStopSec")) == 90
    assert _directive(unit, "Restart") == "on-failure"
    assert _directive(unit, "KillMode") == "mixed"
    assert home.is_dir()

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the unit was checked by hand only")
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(units / "whetstone.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_install_service_refuses_a_bad_config(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("[daemon]\nstop_timeout_s = -1\n")
    result = run_cli("install-service", "--home", str(home), "--unit-dir", str(tmp_path / "u"))
    assert result.returncode != 0
    assert "daemon.stop_timeout_s" in result.stderr
    assert not (tmp_path / "u" / "whetstone.service").exists()


def test_install_service_names_a_unit_dir_it_cannot_write(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the unit folder should be")
    result = run_cli(
        "install-service", "--home", str(tmp_path / "home"), "--unit-dir", str(blocker / "user")
    )
    assert result.returncode == 1
    assert f"cannot write {blocker / 'user' / 'whetstone.service'}" in result.stderr
    assert blocker.read_text() == "a file where the unit folder should be"


@pytest.mark.slow
def test_a_regular_install_carries_the_unit_template(tmp_path: Path) -> None:
    """A non-editable install (a wheel in a fresh environment) writes the unit too: the
    template travels as data under the environment's prefix, not only in the checkout."""
    import sys

    repo = Path(__file__).resolve().parent.parent
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds.
    # Caches are left out: .cache holds the tests' prepared model (~260 MB) and replay answers,
    # none of which a wheel carries.
    source = tmp_path / "source"
    shutil.copytree(
        repo,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            ".gpu",
            ".home",
            "build",
            "*.egg-info",
            "__pycache__",
            ".cache",
            ".hypothesis",
            ".pytest_cache",
            ".ruff_cache",
            ".import_linter_cache",
        ),
    )
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)
    installed = subprocess.run(
        [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    # whetstone from the new environment; its dependencies from this one (PYTHONPATH entries
    # are not site dirs, so this environment's editable-install hook does not apply).
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    units = tmp_path / "units"
    result = subprocess.run(
        [
            str(env / "bin" / "python"),
            "-m",
            "orchestrator.cli",
            "install-service",
            "--home",
            str(tmp_path / "home"),
            "--unit-dir",
            str(units),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": deps},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    unit = (units / "whetstone.service").read_text()
    assert str(env / "bin" / "whetstone") in _directive(unit, "ExecStart")
    assert _directive(unit, "Documentation") == "man:systemd.service(5)"
