"""The codec and rules commands: list the codecs, run one on a single file (or a series
folder, for a volume codec), decode a file, and explain which rule and codec a file gets."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from compacs.service.cli.common import UsageError, config_of, read_dicom


def cmd_codec_list(args: argparse.Namespace) -> int:
    from compacs.codecs import registry

    codecs = [*registry.all_codecs(), *map(registry.get_volume, registry.volume_names())]
    print(f"{'name':<12} {'transfer syntax':<26} {'lossless':<9} {'available':<10} description")
    for codec in codecs:
        print(
            f"{codec.name:<12} {codec.transfer_syntax_uid or '(as received)':<26} "
            f"{'yes' if codec.lossless else 'no':<9} {'yes' if codec.is_available() else 'no':<10} "
            f"{codec.description}"
        )
    missing = [codec for codec in codecs if not codec.is_available()]
    if missing:
        print("\nnot available (a rule naming one of these goes on to its next codec):")
        for codec in missing:
            print(f"{codec.name}: {codec.unavailable_reason()}")
    return 0


def _params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--param {item!r}: write it as key=value")
        params[key] = int(value) if value.lstrip("-").isdigit() else value
    return params


def cmd_codec_encode(args: argparse.Namespace) -> int:
    from compacs.codecs import registry
    from compacs.service.compress import compress
    from compacs.service.rules import CodecChoice

    name = args.codec
    try:
        codec = registry.get_volume(name) if name in registry.volume_names() else registry.get(name)
        params = _params(args.param)
        codec.check_params(params)
    except (KeyError, ValueError) as exc:
        raise UsageError(f"--codec {name}: {exc.args[0]}") from exc
    if name in registry.volume_names():
        return _volume_encode(codec, params, args.input, args.output)
    raw, ds = read_dicom(args.input)
    outcome = compress(raw, ds, [CodecChoice(codec.name, params)])
    if outcome.codec != codec.name and codec.transfer_syntax_uid:
        raise UsageError(f"{args.input}: {codec.name} not applied: {'; '.join(outcome.notes)}")
    args.output.write_bytes(outcome.data)
    derived = outcome.derived
    checked = (
        "verified bit-exact"
        if derived is None
        else f"LOSSY: max |error| {derived.max_error} (bound {derived.bound}), a new instance "
        f"{derived.sop_instance_uid} derived from {derived.source_sop_instance_uid}"
    )
    print(
        f"{args.output}: {codec.name}, {len(raw)} -> {len(outcome.data)} bytes "
        f"(ratio {len(raw) / len(outcome.data):.2f}), {checked}"
    )
    return 0


def _volume_encode(codec: Any, params: dict[str, Any], source: Path, output: Path) -> int:
    """A volume codec on a multi-frame file or a series folder (tiering/volume_codecs.py)."""
    from compacs.service.tiering.volume_codecs import VolumeInputError, encode_file

    try:
        done = encode_file(codec, params, source, output)
    except VolumeInputError as exc:
        raise UsageError(str(exc)) from exc
    print(
        f"{output}: {codec.name}, {done.frames} frames, {done.bytes_received} -> "
        f"{done.bytes_written} bytes (ratio {done.bytes_received / done.bytes_written:.2f}), "
        "verified bit-exact"
    )
    return 0


def cmd_codec_decode(args: argparse.Namespace) -> int:
    from compacs.service.transcode import TranscodeError, transcode

    raw, _ds = read_dicom(args.input)
    try:
        out = transcode(raw, args.transfer_syntax)
    except TranscodeError as exc:
        raise UsageError(f"{args.input}: {exc}") from exc
    args.output.write_bytes(out)
    print(f"{args.output}: {len(out)} bytes, transfer syntax {args.transfer_syntax}")
    return 0


def cmd_rules_explain(args: argparse.Namespace) -> int:
    from compacs.codecs.base import PixelFormat
    from compacs.service.compress import kept_as_received
    from compacs.service.rules import explain, object_attributes
    from compacs.service.tiering import volume_codecs

    config = config_of(args)
    _raw, ds = read_dicom(args.file)
    fmt = PixelFormat.from_dataset(ds) if "PixelData" in ds else None
    attrs = object_attributes(ds, args.calling_ae)
    print(f"rules from {config.source}")
    for line in explain(config.rules, attrs, fmt, kept_as_received(ds)):
        print(line)
    if fmt is not None and fmt.number_of_frames > 1:
        for line in volume_codecs.explain(ds, fmt):
            print(line)
    return 0


def add_codec_commands(sub: Any) -> None:
    """codec (list, encode, decode) and rules (explain)."""
    codec = sub.add_parser("codec", help="list codecs, or run one on a single file")
    csub = codec.add_subparsers(dest="codec_command", required=True, metavar="ACTION")
    p = csub.add_parser("list", help="registered codecs and whether they are available")
    p.set_defaults(func=cmd_codec_list)
    p = csub.add_parser("encode", help="encode IN.dcm with a codec (verified bit-exact)")
    p.add_argument(
        "--codec",
        required=True,
        help="codec name (see `compacs codec list`); a volume codec (hevc, learnvol) takes a "
        "multi-frame file, or a folder holding one series (written as a series volume)",
    )
    p.add_argument("--param", action="append", default=[], metavar="K=V", help="codec parameter")
    p.add_argument("input", type=Path, metavar="IN")
    p.add_argument("output", type=Path, metavar="OUT")
    p.set_defaults(func=cmd_codec_encode)
    p = csub.add_parser("decode", help="decode IN.dcm to an uncompressed syntax")
    p.add_argument("--transfer-syntax", default="1.2.840.10008.1.2.1", help="target syntax UID")
    p.add_argument("input", type=Path, metavar="IN.dcm")
    p.add_argument("output", type=Path, metavar="OUT.dcm")
    p.set_defaults(func=cmd_codec_decode)

    rules = sub.add_parser("rules", help="inspect the compression rules")
    rsub = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    p = rsub.add_parser("explain", help="which rule and codec a file would get, and why")
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--calling-ae", default="", help="pretend the file came from this AE title")
    p.add_argument("file", type=Path, metavar="FILE.dcm")
    p.set_defaults(func=cmd_rules_explain)
