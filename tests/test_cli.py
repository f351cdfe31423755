"""The offline commands on single files, and user mistakes answered with a message, not a trace."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dicomdata
import numpy as np
import pydicom
import pytest

from compacs.service.cli import build_parser, main


def compacs(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compacs.service.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("codec", "ts"),
    [
        ("jpegls", "1.2.840.10008.1.2.4.80"),
        ("j2k", "1.2.840.10008.1.2.4.90"),
        ("htj2k", "1.2.840.10008.1.2.4.201"),
        ("rle", "1.2.840.10008.1.2.5"),
    ],
)
def test_codec_encode_then_decode_round_trips(codec: str, ts: str, tmp_path: Path) -> None:
    src = dicomdata.signed_ct_12bit(tmp_path)
    encoded, decoded = tmp_path / "enc.dcm", tmp_path / "dec.dcm"
    res = compacs("codec", "encode", "--codec", codec, str(src), str(encoded))
    assert res.returncode == 0, res.stderr
    assert "verified bit-exact" in res.stdout
    ds = pydicom.dcmread(encoded)
    assert ds.file_meta.TransferSyntaxUID == ts
    assert ds.SOPInstanceUID == pydicom.dcmread(src).SOPInstanceUID  # lossless: same instance
    res = compacs("codec", "decode", str(encoded), str(decoded))
    assert res.returncode == 0, res.stderr
    assert np.array_equal(pydicom.dcmread(decoded).pixel_array, pydicom.dcmread(src).pixel_array)


def test_codec_that_cannot_take_the_image_says_why(tmp_path: Path) -> None:
    src = dicomdata.testdata_path("SC_rgb_32bit.dcm")
    res = compacs("codec", "encode", "--codec", "jpegls", str(src), str(tmp_path / "o.dcm"))
    assert res.returncode == 2
    assert "jpegls not applied" in res.stderr and "BitsAllocated 32" in res.stderr
    assert "Traceback" not in res.stderr


def test_user_mistakes_get_one_clear_line(tmp_path: Path) -> None:
    res = compacs("codec", "encode", "--codec", "jpeg-xl", "a.dcm", "b.dcm")
    assert res.returncode == 2 and "jpegls" in res.stderr  # lists the known names
    res = compacs("codec", "decode", str(tmp_path / "missing.dcm"), str(tmp_path / "o.dcm"))
    assert res.returncode == 2 and "cannot read a DICOM file" in res.stderr
    res = compacs("stats", "--data", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and "no compacs archive here" in res.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\non_duplicate = "latest"\n')
    res = compacs("serve", "--config", str(bad), "--data", str(tmp_path / "d"))
    assert res.returncode == 2
    assert str(bad) in res.stderr and "keep_first, replace" in res.stderr
    assert "Traceback" not in res.stderr


def test_rules_explain_names_rule_and_codec(tmp_path: Path) -> None:
    src = dicomdata.ct_series(tmp_path / "ct", 1)[0]
    res = compacs("rules", "explain", str(src))
    assert res.returncode == 0
    assert "rule 'greyscale-images': MATCHES" in res.stdout
    assert "codec jpegls: WOULD BE USED" in res.stdout
    res = compacs(
        "rules", "explain", "--calling-ae", "X", str(dicomdata.testdata_path("SC_rgb.dcm"))
    )
    assert "Modality is 'OT'" in res.stdout and "stored as received" not in res.stdout


def test_rules_explain_says_a_lossy_arrival_is_kept_as_received() -> None:
    """The same decision as ingest's compress(): no rule's codec is tried on it."""
    res = compacs("rules", "explain", str(dicomdata.testdata_path("SC_rgb_jpeg_lossy_gdcm.dcm")))
    assert res.returncode == 0, res.stderr
    assert "kept as received, no codec tried: lossy arrival" in res.stdout


def test_commands_refuse_an_index_at_an_older_revision(tmp_path: Path) -> None:
    """Only `compacs db upgrade` changes an existing index's schema; it says so."""
    from sqlalchemy import create_engine

    from compacs.service.storage.schema import migrate

    data = tmp_path / "data"
    (data / "archive").mkdir(parents=True)
    migrate(create_engine(f"sqlite:///{data / 'index.sqlite'}"), "0002")
    res = compacs("stats", "--data", str(data))
    assert res.returncode == 2
    assert "revision 0002" in res.stderr and "compacs db upgrade" in res.stderr
    res = compacs("db", "upgrade", "--data", str(data))
    assert res.returncode == 0 and "upgraded from revision 0002" in res.stdout, res.stderr
    assert compacs("stats", "--data", str(data)).returncode == 0


def test_hevc_encodes_a_multiframe_file_and_a_series_folder(tmp_path: Path) -> None:
    src = dicomdata.testdata_path("emri_small.dcm")  # 10 frames
    encoded, decoded = tmp_path / "hevc.dcm", tmp_path / "back.dcm"
    res = compacs("codec", "encode", "--codec", "hevc", str(src), str(encoded))
    assert res.returncode == 0 and "10 frames" in res.stdout and "bit-exact" in res.stdout, (
        res.stderr
    )
    assert compacs("codec", "decode", str(encoded), str(decoded)).returncode == 0
    assert np.array_equal(pydicom.dcmread(decoded).pixel_array, pydicom.dcmread(src).pixel_array)
    series = dicomdata.real_mr_series(tmp_path / "series")
    res = compacs("codec", "encode", "--codec", "hevc", str(series[0].parent), str(tmp_path / "v"))
    assert res.returncode == 0 and "20 frames" in res.stdout, res.stderr
    res = compacs("codec", "encode", "--codec", "hevc", str(series[0]), str(tmp_path / "x"))
    assert res.returncode == 2 and "a single frame" in res.stderr


def test_rules_explain_says_why_a_volume_does_not_qualify(tmp_path: Path) -> None:
    """A 15-bit CR (two frames of the real radiograph): its span needs more than 12 bits."""
    ds = pydicom.dcmread(dicomdata.testdata_path("RG1_UNCR.dcm"))
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    wide = tmp_path / "cr2.dcm"
    ds.save_as(wide)
    res = compacs("rules", "explain", str(wide))
    assert res.returncode == 0, res.stderr
    assert "hevc: does not qualify: value span" in res.stdout, res.stdout
    res = compacs("rules", "explain", str(dicomdata.testdata_path("emri_small.dcm")))
    assert "hevc: qualifies" in res.stdout


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str | None]]:
    """Every command and action of the parser, with the help line `--help` lists for it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for listed in action._choices_actions:
                command = (*path, listed.dest)
                yield command, listed.help
                yield from _commands(action.choices[listed.dest], command)


COMMANDS = list(_commands(build_parser()))


def test_the_help_walk_reaches_nested_actions() -> None:
    names = {" ".join(command) for command, _ in COMMANDS}
    assert {"serve", "tier run", "db upgrade", "codec encode", "rules explain"} <= names


@pytest.mark.parametrize(("command", "what"), COMMANDS, ids=[" ".join(c) for c, _ in COMMANDS])
def test_every_command_has_help(
    command: tuple[str, ...], what: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`compacs CMD --help` exits 0 and opens with what CMD does; new commands are walked
    into this test from the parser."""
    name = " ".join(command)
    assert what, f"`compacs {name}` has no help= text saying what it does"
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: compacs {name}"), out
    assert " ".join(what.split()) in " ".join(out.split()), out  # argparse re-wraps it


def test_top_level_help_lists_every_command() -> None:
    """The real entry point, in a process of its own."""
    res = compacs("--help")
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    for command, what in COMMANDS:
        if len(command) == 1:
            assert f"{command[0]} {' '.join((what or '').split())}" in text, command
