"""deploy/compacs.service as systemd reads it: `systemd-analyze verify` finds nothing to
say about it (it exits 0 even for an unknown key or a bad value, so its output is checked,
not only its exit status), and it keeps the properties the README promises."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import peers
import pytest

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "compacs.service"


def systemd_analyze() -> str:
    """systemd-analyze, installed with Debian's `systemd` package when missing."""
    if shutil.which("systemd-analyze") is None:
        with peers._file_lock(peers.STATE_DIR / "apt.lock"):
            if shutil.which("systemd-analyze") is None:
                peers._apt_install(["systemd"])
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze still missing after apt-get install systemd"
    return found


def verify(text: str, tmp_path: Path) -> str:
    """What `systemd-analyze verify` says about a unit file of this text ("" when nothing).

    ExecStart points at this checkout's `compacs` (verify checks that it exists), as it
    points at /opt/compacs' in an installation made as the unit's comment says.
    """
    compacs = Path(sys.executable).parent / "compacs"
    assert compacs.exists(), f"no {compacs}: install the checkout (make .venv/.installed)"
    unit = tmp_path / "compacs.service"
    unit.write_text(text.replace("/opt/compacs/bin/compacs", str(compacs)))
    res = subprocess.run(
        [systemd_analyze(), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    return (res.stdout + res.stderr).strip() + (
        "" if res.returncode == 0 else f" (rc {res.returncode})"
    )


def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    assert verify(UNIT.read_text(), tmp_path) == ""


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("ProtectClock=yes", "ProtectClocks=yes", "Unknown key"),
        ("Restart=on-failure", "Restart=sometimes", "restart specifier"),
    ],
)
def test_the_check_catches_a_broken_unit(
    old: str, new: str, complaint: str, tmp_path: Path
) -> None:
    text = UNIT.read_text()
    assert old in text
    assert complaint in verify(text.replace(old, new), tmp_path)


def test_own_user_state_directory_restart_and_hardening() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    assert service["User"] == "compacs" and service["DynamicUser"] == "yes"
    assert service["StateDirectory"] == "compacs"
    assert service["Restart"] == "on-failure"
    assert "ExecReload" not in service  # compacs has no reload (README: restart instead)
    hardening = (
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "RestrictAddressFamilies",
        "SystemCallFilter",
        "CapabilityBoundingSet",
    )
    for key in hardening:
        assert key in service, key
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""
