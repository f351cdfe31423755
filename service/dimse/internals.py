"""The one place that decides whether the node may reach into pynetdicom's internals.

Several modules replace or read private attributes of pynetdicom objects, for speed
(pdu_runs, bulk_store, find_responses, polling, the cheap context copies in scp) or for
safety (receive_limits, admission). They were written against pynetdicom 3.0.4, which
pyproject pins. On any other version they stand down and the node uses pynetdicom's own
paths: the fast paths are then simply slower, and the safety guards log once that a limit
is not enforced. The fast paths can also be switched off by `[node] fast_paths = false`
or `COMPACS_FAST_PATHS=0` (the tests run C-FIND, C-GET and C-MOVE both ways).
"""

from __future__ import annotations

import logging
import os

import pynetdicom

log = logging.getLogger("compacs.dimse")

TESTED_PYNETDICOM = "3.0.4"
_state = {"fast_paths": True, "warned": set()}


def version_matches() -> bool:
    return pynetdicom.__version__ == TESTED_PYNETDICOM


def configure(fast_paths: bool) -> None:
    """Set at start (settings.apply, from node.py): the config's choice, overridden by the
    environment."""
    env = os.environ.get("COMPACS_FAST_PATHS")
    if env is not None:
        fast_paths = env.strip().lower() not in ("0", "false", "no", "off")
    _state["fast_paths"] = fast_paths
    if version_matches():
        log.info("pynetdicom fast paths %s", "on" if fast_paths else "off (pynetdicom's own)")
    else:
        log.warning(
            "pynetdicom %s is not the version compacs was tested with (%s): its fast paths "
            "and receive limits are off, pynetdicom's own paths are used",
            pynetdicom.__version__,
            TESTED_PYNETDICOM,
        )


def fast_paths() -> bool:
    """Whether the speed-ups that replace pynetdicom internals may be used."""
    return _state["fast_paths"] and version_matches()


def guards(feature: str) -> bool:
    """Whether a safety guard that relies on pynetdicom internals may be installed; logs once
    per feature when it may not."""
    if version_matches():
        return True
    if feature not in _state["warned"]:
        _state["warned"].add(feature)
        log.warning("%s is not enforced on pynetdicom %s", feature, pynetdicom.__version__)
    return False
