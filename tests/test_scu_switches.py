"""pynetdicom's process-wide switches as the SCU holds them (dimse/scu/switches.py): on
while any call needs them, and back to what they were after the last, whatever the order
in which overlapping calls (threads of one process) let go. Real pynetdicom globals and
its real logger; no peer needed."""

from __future__ import annotations

import logging

from pynetdicom import _config

from compacs.service.dimse.scu import switches


def test_overlapping_holders_keep_a_switch_on_until_the_last_lets_go() -> None:
    before = _config.STORE_SEND_CHUNKED_DATASET
    first, second = switches.send_files_undecoded(), switches.send_files_undecoded()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first call ends while the second still sends
    assert _config.STORE_SEND_CHUNKED_DATASET is True
    second.__exit__(None, None, None)
    assert _config.STORE_SEND_CHUNKED_DATASET is before
    with switches.receive_to_files():
        assert _config.STORE_RECV_CHUNKED_DATASET is True
    assert _config.STORE_RECV_CHUNKED_DATASET is False


def test_quiet_captures_pynetdicom_errors_and_restores_the_logger() -> None:
    logger = logging.getLogger("pynetdicom")
    saved = logger.level, logger.propagate
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)  # not debug: the errors are held back
    try:
        outer = switches.pynetdicom_quiet()
        errors = outer.__enter__()
        with switches.pynetdicom_quiet() as inner:
            logging.getLogger("pynetdicom.assoc").error("Reason: calling AE title not recognised")
        assert logger.propagate is False and logger.level == logging.ERROR
        outer.__exit__(None, None, None)
        assert errors.lines == inner.lines == ["Reason: calling AE title not recognised"]
        assert (logger.level, logger.propagate) == saved
    finally:
        logging.getLogger().setLevel(root_level)
