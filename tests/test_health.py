"""`compacs health` against a real node process: one line, exit 0 when healthy, 1 naming
what failed (C-ECHO to the node, index, archive, free disk), never 2 (a container
HEALTHCHECK reserves it)."""

from __future__ import annotations

from pathlib import Path

import peers
from conftest import MakeNode


def health(node: peers.CompacsProcess, *args: str, **env: str) -> tuple[int, str]:
    res = node.cli(
        "health", "--data", str(node.data_dir), "--port", str(node.port),
        "--ae-title", node.ae_title, *args, timeout=120, env=env,
    )  # fmt: skip
    lines = res.stdout.splitlines()
    assert len(lines) == 1, f"not one line:\n{res.stdout}{res.stderr}"
    return res.returncode, lines[0]


def test_a_running_node_is_healthy(compacs_node: peers.CompacsProcess) -> None:
    rc, line = health(compacs_node)
    assert rc == 0, line
    assert line.startswith("healthy: ")
    assert f"C-ECHO COMPACS@127.0.0.1:{compacs_node.port} ok" in line
    assert "index ok" in line
    assert f"{compacs_node.data_dir / 'archive'} writable" in line
    assert "GB free" in line


def test_a_stopped_node_fails_the_echo_only(compacs_node: peers.CompacsProcess) -> None:
    compacs_node.stop()
    rc, line = health(compacs_node, "--timeout", "5")
    assert rc == 1
    assert line.startswith(f"unhealthy: C-ECHO: COMPACS@127.0.0.1:{compacs_node.port}: ")
    assert "index" not in line and "archive" not in line and "disk" not in line


def test_an_access_table_that_keeps_the_check_out_still_counts_as_an_answer(
    make_node: MakeNode,
) -> None:
    # local_callers = false: callers on the node's own host (the check among them) would
    # otherwise be let in to every service (docs/security.md)
    node = make_node(
        '[access]\nstore = ["MODALITY"]\nquery = ["VIEWER"]\nretrieve = ["VIEWER"]\n'
        "local_callers = false\n"
    )
    rc, line = health(node)
    assert rc == 0, line
    assert "answers (association rejected by its [access])" in line


def test_too_little_free_disk(compacs_node: peers.CompacsProcess) -> None:
    rc, line = health(compacs_node, "--min-free-gb", "1000000")
    assert rc == 1
    assert line.startswith("unhealthy: disk: ") and "below 1000000.0 GB" in line


def test_an_unreachable_index(compacs_node: peers.CompacsProcess) -> None:
    closed = peers.free_port()
    url = f"postgresql+psycopg://compacs@127.0.0.1:{closed}/compacs"
    rc, line = health(compacs_node, "--timeout", "5", COMPACS_INDEX_URL=url)
    assert rc == 1
    assert line.startswith("unhealthy: index: postgresql+psycopg://compacs:")  # redacted
    assert f"@127.0.0.1:{closed}/compacs: unreachable: " in line
    assert "C-ECHO" not in line


def test_an_archive_that_cannot_be_written(
    compacs_node: peers.CompacsProcess, tmp_path: Path
) -> None:
    """Root (CI) writes through any mode bits, so the archive here is a file, not a folder."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "archive").write_text("not a folder")
    res = compacs_node.cli(
        "health", "--data", str(broken), "--port", str(compacs_node.port), timeout=120
    )
    assert res.returncode == 1
    line = res.stdout.strip()
    assert f"archive: {broken / 'archive'} not writable: Not a directory" in line
    assert "index: sqlite:///" in line and "no such file" in line  # never created empty
    assert not (broken / "index.sqlite").exists()


def test_a_config_mistake_is_unhealthy_with_exit_1(
    compacs_node: peers.CompacsProcess, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 'eleven'\n")
    res = compacs_node.cli("health", "--config", str(bad), timeout=120)
    assert res.returncode == 1
    assert res.stdout.startswith(f"unhealthy: config: {bad}")
