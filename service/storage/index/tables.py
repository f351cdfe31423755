"""The tables the index's Core statements run on (schema.py maps them as classes for the ORM
half of the package: its docstring says which half does what)."""

from __future__ import annotations

from compacs.service.storage.schema import (
    Acknowledgement,
    AuditEvent,
    Blob,
    Instance,
    Patient,
    Series,
    Study,
)

_INSTANCE = Instance.__table__
_BLOB = Blob.__table__
_SERIES = Series.__table__
_STUDY = Study.__table__
_PATIENT = Patient.__table__
_ACK = Acknowledgement.__table__
_AUDIT = AuditEvent.__table__
