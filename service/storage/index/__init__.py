"""The SQL index: what the archive holds, where each instance's bytes are, and who is
compressing what (schema.py has the tables and why they look as they do).

Several processes may share one index (PostgreSQL; SQLite on one machine): every change
that others may race is a compare-and-swap (an instance's version, a claim's owner), a
conditional update, or an insert whose unique-key conflict is taken as "someone else was
first". Within one process, writes go through a lock: on SQLite that avoids the 3-25 ms
lock waits measured with concurrent writers. SQLite write transactions begin IMMEDIATE, so
that a transaction never has to upgrade a read snapshot another process has outdated.

One module per job:

- engine.py: opening the database (IndexUnavailable says what to fix), SQLite's settings,
  the serialised write transaction, leases.
- attributes.py: a data set's attributes as the index's column values.
- tables.py: the tables the Core statements run on.
- ingest_writes.py: a received object's instance and blob rows, and the series and study
  rows it names (the node's hot path).
- patients.py: patient rows, PatientID conflicts, and revision 0007's patient backfill.
- claims.py: compression claims and the results recorded under them.
- move_claims.py: tier-move candidates, claims and the move's commit.
- blobs.py: blob rows from written to released to swept, and fixity.
- problems.py: flagged, parked and patient problems, acknowledgements, requeue.
- reports.py: counts of the archive, and the audit log.
- reads.py: instances read with their blob, series and study; UID matching.

The rule the code follows: SQLAlchemy Core (statements on the tables, a Connection) for
every write and for every read on a hot path or that returns values (counts, tuples, named
tuples); the ORM (a Session from `reading()`, mapped classes) only for reads that hand
mapped rows to their callers (`Instance` with its blob, series and study). The ORM cost more
CPU per image than receiving it did (measured with py-spy on ingest), and a Session adds
nothing to a statement whose result is not a mapped object. `writing()` gives an ORM session
in the write transaction for tests and repairs by hand; no job of the node writes through it.

`Index` is the one object every caller holds (ArchiveService.index): each job is a small
class over the same `engine.Connections` (one engine, one write lock), and `Index` is their
sum. Per-job classes rather than an `Index` that forwards to job objects: the callers call
about fifty verbs on one object, and forwarding would repeat each signature a second time
for nothing; a job class reaches no other job's state, only the engine and the lock.
"""

from __future__ import annotations

from compacs.service.storage.index.blobs import BlobRecords, NewBlob
from compacs.service.storage.index.claims import Claim, CompressionClaims
from compacs.service.storage.index.engine import IndexUnavailable, lease, open_engine
from compacs.service.storage.index.ingest_writes import (
    DuplicateInstance,
    IngestWrites,
    ReceivedVersion,
)
from compacs.service.storage.index.move_claims import MoveClaims
from compacs.service.storage.index.patients import PatientBackfill
from compacs.service.storage.index.problems import (
    Acknowledged,
    PatientConflict,
    PatientProblem,
    Problem,
    Problems,
    patient_label,
)
from compacs.service.storage.index.reads import Reads, uid_in
from compacs.service.storage.index.reports import Reports
from compacs.service.storage.schema import Blob, Instance, Patient, Series, Study

__all__ = [
    "Acknowledged",
    "Blob",
    "Claim",
    "DuplicateInstance",
    "Index",
    "IndexUnavailable",
    "Instance",
    "NewBlob",
    "Patient",
    "PatientConflict",
    "PatientProblem",
    "Problem",
    "ReceivedVersion",
    "Series",
    "Study",
    "lease",
    "open_engine",
    "patient_label",
    "uid_in",
]


class Index(
    IngestWrites,
    CompressionClaims,
    MoveClaims,
    BlobRecords,
    PatientBackfill,
    Problems,
    Reports,
    Reads,
):
    """The index: `Index.open(url)`, then the verbs of every job (the package docstring)."""
