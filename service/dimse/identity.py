"""Who compacs says it is on the wire: its Implementation Class UID and Version Name.

PS3.7 D.3.3.2 has every implementation identify itself in A-ASSOCIATE-RQ and -AC; a peer's
logs and a site's interface list then name compacs rather than pynetdicom, whose identity
pynetdicom sends by default. The UID was made once from a UUID (PS3.5 B.2: 2.25 and the
UUID as one integer) and never changes; the version name follows the package version, so
that a peer's log tells releases apart.
"""

from __future__ import annotations

from importlib import metadata

from pynetdicom import AE

IMPLEMENTATION_CLASS_UID = "2.25.297776228254263982098134224798671927773"


def version_name() -> str:
    """"COMPACS_" and the release's digits ("COMPACS_010" for 0.1.0): at most 16 characters
    of the SH-like value PS3.7 allows."""
    try:
        version = metadata.version("compacs")
    except metadata.PackageNotFoundError:  # run from a source tree that was not installed
        version = "0"
    digits = "".join(c for c in version.split("+")[0] if c.isalnum())
    return f"COMPACS_{digits}"[:16]


IMPLEMENTATION_VERSION_NAME = version_name()


def apply(ae: AE) -> None:
    """Identify `ae`'s associations, requested and accepted, as compacs'."""
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
