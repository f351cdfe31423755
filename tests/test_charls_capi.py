"""JPEG-LS through CharLS's C API (codecs/charls_capi.py) writes the bytes pyjpegls writes.

The C API path is what the node uses where imagecodecs ships the tested CharLS; pyjpegls is
the plain path, used elsewhere. Byte-identical codestreams mean that everything
tests/test_codecs.py proves of one (DCMTK, pydicom's plugins and our decoder read it
bit-exact, precision = BitsStored, no SPIFF header) holds for the other.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_codecs import REAL_FILES, _source

from compacs.codecs import charls_capi, registry
from compacs.codecs.base import to_unsigned_bits
from compacs.codecs.jpegls import JpegLS

pytestmark = pytest.mark.skipif(
    charls_capi.encoder() is None, reason="imagecodecs does not ship the tested CharLS"
)

CODEC = registry.get("jpegls")


def _cases() -> list[tuple[str, int]]:
    """Each real file JPEG-LS takes; colour ones in each interleave mode."""
    cases = []
    for name in REAL_FILES:
        fmt = _source(name)[0]
        if CODEC.unsupported_reason(fmt) is None:
            cases += [(name, ilv) for ilv in ((0, 1, 2) if fmt.samples_per_pixel > 1 else (2,))]
    return cases


@pytest.mark.parametrize(("name", "ilv"), _cases())
def test_same_bytes_as_pyjpegls(name: str, ilv: int) -> None:
    fmt, frames = _source(name)
    for frame in frames[:3]:
        ours = CODEC.encode_frame(frame, fmt, interleave_mode=ilv)
        data = to_unsigned_bits(frame, fmt)
        if fmt.samples_per_pixel > 1 and ilv == 0:
            data = data.transpose(2, 0, 1)
        reference = JpegLS.encode_pyjpegls(
            np.ascontiguousarray(data), fmt, ilv if fmt.samples_per_pixel > 1 else 0
        )
        assert ours == reference, f"{name} ilv {ilv}: {len(ours)} vs {len(reference)} bytes"
        assert np.array_equal(CODEC.decode_frame(ours, fmt), frame)


def test_threads_share_the_encoder() -> None:
    """ctypes releases the GIL in the call: encoders in threads must not share state."""
    fmt, frames = _source("RG1_UNCR.dcm")
    expected = CODEC.encode_frame(frames[0], fmt)
    results: list[bytes] = []

    def work() -> None:
        results.extend(CODEC.encode_frame(frames[0], fmt) for _ in range(3))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected] * 12


def test_input_must_match_the_frame() -> None:
    encode = charls_capi.encoder()
    with pytest.raises(ValueError, match="does not match the frame"):
        encode(np.zeros((4, 4), np.uint16), 4, 5, 1, 12, 0)
    with pytest.raises(RuntimeError, match="CharLS"):  # bits out of range: CharLS says why
        encode(np.zeros((4, 4), np.uint16), 4, 4, 1, 17, 0)


def test_other_charls_version_or_switch_takes_pyjpegls(monkeypatch: pytest.MonkeyPatch) -> None:
    fmt, frames = _source("CT_small.dcm")
    expected = CODEC.encode_frame(frames[0], fmt)
    try:
        monkeypatch.setattr(charls_capi, "TESTED_CHARLS", "0.0.0")
        charls_capi.encoder.cache_clear()
        assert charls_capi.encoder() is None
        assert CODEC.encode_frame(frames[0], fmt) == expected  # through pyjpegls
        monkeypatch.undo()
        monkeypatch.setenv("COMPACS_CHARLS_CAPI", "0")
        charls_capi.encoder.cache_clear()
        assert charls_capi.encoder() is None
    finally:
        monkeypatch.undo()
        charls_capi.encoder.cache_clear()
    assert charls_capi.encoder() is not None
