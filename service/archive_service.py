"""The one archive service: it owns the config, the index, the archive and the compression
jobs, and everything else goes through it: the DIMSE handlers, the maintenance commands,
the CLI, the scheduler and the web face. Nothing else assembles an index and an archive of
its own.

It also runs the node's housekeeping while it serves: renewing this process' claims,
taking over pending objects whose owner died, and deleting released blobs once no reader
can still be sending them (a grace period after they were replaced).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import Dataset

from compacs.service import query, retrieve
from compacs.service.config import NodeConfig, TieringConfig
from compacs.service.ingest import Ingest
from compacs.service.jobs import Jobs
from compacs.service.storage.archive import Archive, age
from compacs.service.storage.blobstore import BlobStore
from compacs.service.storage.index import (
    Index,
    Instance,
    NewBlob,
    PatientProblem,
    Problem,
    lease,
)
from compacs.service.storage.schema import HOT_TIER, utcnow
from compacs.service.storage.stores import open_store
from compacs.service.tiering.policy import Tier
from compacs.service.tiering.volumes import VolumeReader
from compacs.service.wire import STREAM_ABOVE

log = logging.getLogger("compacs.archive")


class NoArchive(FileNotFoundError):
    """No compacs data folder where one was expected; the message says which to give."""


def owner_name(config: NodeConfig) -> str:
    """This node's name on its claims: the host and the DICOM port, which no two live nodes
    share, so a restarted node knows its previous life's claims for its own; with `serve
    --processes N` the second and later processes add their number (the first keeps the
    plain name, as a node of one process has it)."""
    name = f"{socket.gethostname()}:{config.port}"
    return f"{name}/{config.process}" if config.process else name


class ArchiveService:
    def __init__(
        self, config: NodeConfig, archive: Archive, index: Index, jobs: Jobs | None = None
    ) -> None:
        self.config = config
        self.archive = archive  # the hot tier's, where objects arrive
        self.archives: dict[str, BlobStore] = {
            HOT_TIER: archive,
            **{t.name: open_store(t.store) for t in config.tiers},
        }
        self.volumes = VolumeReader()
        self.index = index
        self.jobs = jobs
        self.ingest = Ingest(config, archive, index, jobs) if jobs is not None else None
        self._stop = threading.Event()
        self._housekeeping: threading.Thread | None = None
        self._scheduler = None
        self.owner = owner_name(config)

    @classmethod
    def open(
        cls,
        config: NodeConfig,
        *,
        jobs: bool = False,
        create: bool = False,
        executor_factory: Callable[[], Executor] | None = None,
    ) -> ArchiveService:
        """Open a node's data folder and index. `create` (serve): make the folder, and the
        schema of an empty index; any other index must be at this compacs' revision
        (`compacs db upgrade` brings it there). `jobs`: this process compresses."""
        archive_root = config.data_dir / "archive"
        if create:
            config.data_dir.mkdir(parents=True, exist_ok=True)
        elif not archive_root.is_dir():
            raise NoArchive(
                f"{config.data_dir}: no compacs archive here (expected {archive_root}); "
                "give the --data folder that `compacs serve` used"
            )
        url = config.effective_index_url
        index = Index.open(url, create=create, check=f"{config.source}: index {redact(url)}")
        archive = Archive(archive_root)
        runner = (
            Jobs(config, archive, index, owner_name(config), executor_factory) if jobs else None
        )
        return cls(config, archive, index, runner)

    # --- the DIMSE face's calls ---
    def receive(self, raw: bytes | Path, calling_ae: str, sop_class: str, sop_inst: str) -> int:
        """C-STORE: archive one object (its bytes, or the file a big one was spooled to),
        return the status to answer."""
        if self.ingest is None:
            raise RuntimeError("this archive service was opened without compression jobs")
        return self.ingest.receive(raw, calling_ae, sop_class, sop_inst)

    def instances_for(self, identifier: Dataset) -> list[Instance]:
        """C-GET/C-MOVE: the instances an identifier names (raises retrieve.RetrieveError)."""
        return retrieve.matching_instances(self.index, identifier)

    def read_instance(self, inst: Instance) -> bytes:
        """The stored bytes of one instance, checked against their checksum. A blob that is
        gone was replaced meanwhile (compressed, re-sent): the row is read once more and the
        new blob read instead."""
        try:
            return self._read(inst)
        except FileNotFoundError:
            fresh = self.index.instance(inst.id)
            if fresh is None or fresh.blob_pk == inst.blob_pk:
                raise
            return self._read(fresh)

    def open_instance(self, inst: Instance) -> tuple[BinaryIO, int, int] | None:
        """A big instance's blob (over wire.STREAM_ABOVE), open and checked against its
        checksum, with the offset and length of the instance in it, to be sent or exported
        from the file; None for one to read whole (small, or a slice of a series volume).
        A blob replaced meanwhile is found again as in read_instance."""
        if inst.frame_first is not None or inst.blob_length <= STREAM_ABOVE:
            return None
        try:
            return self._open(inst)
        except FileNotFoundError:
            fresh = self.index.instance(inst.id)
            if fresh is None or fresh.blob_pk == inst.blob_pk:
                raise
            return self._open(fresh) if fresh.frame_first is None else None

    def _open(self, inst: Instance) -> tuple[BinaryIO, int, int]:
        archive = self.archive_for(inst.blob.tier)
        file = archive.open_checked(
            inst.blob.path, inst.blob_offset, inst.blob_length, inst.checksum
        )
        return file, inst.blob_offset, inst.blob_length

    def _read(self, inst: Instance) -> bytes:
        archive = self.archive_for(inst.blob.tier)
        if inst.frame_first is not None:  # a slice of a series volume
            return self.volumes.slice_part10(
                archive,
                inst.blob.path,
                inst.blob_offset,
                inst.blob_length,
                inst.checksum,
                inst.frame_first,
                inst.codec,
            )
        return archive.read_range(inst.blob.path, inst.blob_offset, inst.blob_length, inst.checksum)

    def archive_for(self, tier: str) -> BlobStore:
        """The store of a tier, a folder or a bucket (a blob on a tier no longer in the
        config: say so)."""
        try:
            return self.archives[tier]
        except KeyError:
            raise FileNotFoundError(
                f"tier {tier!r} holds this blob but is not in the config's [[tiers]]: add it "
                "back (name and root) to read it"
            ) from None

    def mark_accessed(self, instance_ids: list[int]) -> None:
        """Retrieved now (C-GET, C-MOVE): tiers with since = "accessed" count from here."""
        if instance_ids:
            self.index.mark_accessed(instance_ids)

    # --- start, housekeeping, stop ---
    def recover(self) -> int:
        """At start: drop what a crash left half-done (temp, spool and orphan files older than
        any live job's lease), and take over this node's and dead nodes' pending objects."""
        removed = self.remove_leftovers()
        queued = self.jobs.claim_abandoned(own_too=True) if self.jobs else 0
        if removed or queued:
            log.info(
                "recovery: %d leftover file(s) removed, %d pending object(s) re-queued for "
                "compression",
                removed,
                queued,
            )
        return queued

    def remove_leftovers(self, under: str = "") -> int:
        """Delete what dead writers left (any process': temp and spool files, and blobs no
        index row knows, in the archive or `under` one of its folders), once older than a
        lease: a live one would have indexed its files by then. Housekeeping looks at
        incoming/ only (the whole tree is walked at start and by verify)."""
        grace = self.config.ingest.lease_seconds
        removed = self.archive.clean_tmp(older_than=grace)
        for leftover in (self.config.data_dir / "spool").glob("spool-*.dcm"):
            if age(leftover) > grace:  # data sets a crash cut off: never acknowledged
                leftover.unlink(missing_ok=True)
                removed += 1
        known = self.index.blob_paths()
        for archive in self.archives.values() if not under else [self.archive]:
            for path in [p for p in archive.blobs(grace, under) if p not in known]:
                if path not in self.index.blob_paths():  # looked at again: indexed meanwhile?
                    archive.delete(path)
                    removed += 1
        return removed

    def start_housekeeping(self) -> None:
        self._housekeeping = threading.Thread(
            target=self._housekeep, name="compacs-housekeeping", daemon=True
        )
        self._housekeeping.start()

    def _housekeep(self) -> None:
        """Renew claims a few times per lease; take over abandoned work and sweep released
        blobs about twice per lease; remove dead writers' leftovers every two leases."""
        tick = max(0.5, self.config.ingest.lease_seconds / 4)
        beat = 0
        while not self._stop.wait(tick):
            beat += 1
            try:
                if self.jobs is not None:
                    self.jobs.renew()
                    if beat % 2 == 0:
                        self.jobs.claim_abandoned()
                if beat % 2 == 0:
                    self.sweep()
                if beat % 8 == 0:
                    self.remove_leftovers(under="incoming")
            except Exception:
                log.exception("housekeeping failed; trying again at the next beat")

    def sweep(self) -> int:
        """Delete blobs released longer ago than `[storage] delete_grace_seconds`: no C-GET
        that started before their release can still be reading them."""
        before = utcnow() - timedelta(seconds=self.config.storage.delete_grace_seconds)
        count = 0
        for blob_pk, tier, path in self.index.released_blobs(before):
            self.archive_for(tier).delete(path)
            self.index.forget_blob(blob_pk)
            count += 1
        if count:
            log.info("sweep: %d released blob(s) deleted", count)
        return count

    # --- tiering ---
    def tier_run(self, now=None, *, progress: bool = False, executor=None):  # noqa: ANN001, ANN201
        """Move what is due (tiering/moves.py); a RunReport."""
        from compacs.service.tiering import moves

        return moves.run_due(
            self, self.owner, now, progress=progress, executor=executor, stop=self._stop.is_set
        )

    def fixity_run(self, *, limit: int = 1000, progress: bool = False):  # noqa: ANN201
        """Re-read and check blobs that are due (tiering/fixity.py); a FixityReport."""
        from compacs.service.tiering import fixity

        return fixity.run(self, limit=limit, progress=progress)

    def start_scheduler(self) -> None:
        from compacs.service.tiering import scheduler

        self._scheduler = scheduler.start(self, self.owner)

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self.jobs.wait_idle(timeout) if self.jobs is not None else True

    def close(self) -> None:
        self._stop.set()
        if self._scheduler is not None:
            from compacs.service.tiering import scheduler

            scheduler.stop(self._scheduler)  # waits for a running job: it stops after its move
        if self._housekeeping is not None:
            self._housekeeping.join(timeout=10)
        if self.jobs is not None:
            self.jobs.shutdown()
        self.index.close()

    # -- verbs used by tiering/moves.py, tiering/fixity.py, tiering/scheduler.py, maintenance.py --
    @property
    def tiers(self) -> list[Tier]:
        """The configured tiers, warm to cold ([[tiers]])."""
        return self.config.tiers

    @property
    def tiering(self) -> TieringConfig:
        """[tiering]: when the tier and fixity jobs run, and their share of one core."""
        return self.config.tiering

    @property
    def worker_log_format(self) -> str:
        """[logging] format: worker processes log as the node does."""
        return self.config.logging.format

    @property
    def lease_seconds(self) -> float:
        """How long a claim holds without renewal ([ingest] lease_seconds): a job renews its
        claims well within it."""
        return self.config.ingest.lease_seconds

    def audit(self, kind: str, **fields: str | None) -> None:
        """One event of the audit trail; `fields`: Index.audit's sop_uid, calling_ae, detail."""
        self.index.audit(kind, **fields)

    def tier_candidates(self, after_id: int, limit: int) -> list[Any]:
        """Stored instances a tier may take, by id after `after_id` (a page of `limit`)."""
        return self.index.tier_candidates(after_id, limit)

    def series_instances(self, series_pks: list[int]) -> dict[int, tuple[int, int, datetime]]:
        """Per series: its instances, how many are stored, and when the last one arrived."""
        return self.index.series_instances(series_pks)

    def claim_for_move(self, wanted: list[tuple[int, int]], owner: str) -> set[int]:
        """Claim stored instances (id, version) for a tier move, for one lease; the ids
        claimed (fewer than wanted: another node or a re-send took some)."""
        return self.index.claim_stored(wanted, owner, lease(self.lease_seconds))

    def renew_move_claims(self, ids: list[int], owner: str) -> None:
        """Hold a running move's claims for another lease."""
        self.index.renew_move_claims(ids, owner, lease(self.lease_seconds))

    def unclaim(self, ids: list[int], owner: str) -> None:
        """Give up a move's claims: the instances stay where they are, due for the next run."""
        self.index.unclaim(ids, owner)

    def commit_move(self, owner: str, tier: str, blobs: list[NewBlob], placed: list[Any]) -> bool:
        """Point the moved instances at their new blobs on `tier`, in one transaction; False
        (nothing changed) when one of them changed since it was claimed."""
        return self.index.commit_move(owner, tier, blobs, placed)

    def fixity_due(self, limit: int) -> list[tuple[int, str, str, str, str]]:
        """Blobs never checked or checked longer ago than [tiering] fixity_max_age_days,
        longest ago first: (blob id, tier, path, checksum, kind)."""
        max_age = timedelta(days=self.config.tiering.fixity_max_age_days)
        return self.index.fixity_due(utcnow() - max_age, limit)

    def record_fixity(self, blob_pk: int, error: str | None) -> None:
        self.index.record_fixity(blob_pk, error)

    def kept_undecodable(self, blob_pk: int) -> bool:
        """Whether the blob is an object kept as received and flagged as not decoding."""
        return self.index.kept_undecodable(blob_pk)

    def job_store_engine(self) -> Any:
        """The engine the scheduler keeps its jobs with, in the index's database."""
        return self.index.engine_for_other_writers()

    def add_flag(self, instance_pk: int, defect: str) -> None:
        """Flag an instance as kept although non-conformant (`compacs problems` lists it)."""
        self.index.add_flag(instance_pk, defect)

    def orphan_blobs(self) -> list[tuple[str, str]]:
        """Blobs on disk that no index row knows, (tier, path), left out those younger than a
        lease: a live node may still be writing them."""
        known = self.index.blob_paths()
        return [
            (tier, path)
            for tier, archive in self.archives.items()
            for path in archive.blobs(older_than=self.lease_seconds)
            if path not in known
        ]

    # -- verbs used by service/cli --
    def stats(self) -> dict[str, Any]:
        """Instances, studies, bytes and ratios, in all and per modality, codec and tier."""
        return self.index.stats()

    def instances(
        self, *, study_uid: str | None = None, series_uid: str | None = None
    ) -> list[Instance]:
        """The instances of a study or series; of the whole archive without either."""
        return self.index.instances(study_uid=study_uid, series_uid=series_uid)

    def problems(self) -> Problems:
        """What needs a person: parked and flagged objects, patient-ID conflicts, blobs that
        failed fixity, studies whose patient the 0007 upgrade could not confirm."""
        return Problems(
            self.index.problems(),
            self.index.patient_problems(),
            self.index.fixity_failures(),
            self.index.patient_unverified_studies(),
        )

    def acknowledge(self, *selection: Any, **options: Any) -> list[Problem | PatientProblem]:
        """Acknowledge the selected problems as they read now: problems.acknowledge's
        arguments after the index (uids, studies, everything, by, note, patient_ids, issuer)."""
        from compacs.service import problems

        return problems.acknowledge(self.index, *selection, **options)

    def requeue(self, uids: list[str], studies: list[str], everything: bool, by: str) -> int:
        """Send the selected parked objects back to compression (problems.requeue)."""
        from compacs.service import problems

        return problems.requeue(self.index, uids, studies, everything, by)

    def tier_status(self) -> TierStatus:
        """Per tier what it holds; what is due to move now; fixity; the last tier run."""
        from compacs.service.tiering import moves

        backlog: dict[str, int] = {}
        for move in moves.plan(self, moves.utcnow(), limit=10**9):
            backlog[move.tier.name] = backlog.get(move.tier.name, 0) + len(move.rows)
        return TierStatus(
            [HOT_TIER, *(t.name for t in self.config.tiers)],
            self.index.stats()["by_tier"],
            backlog,
            self.index.fixity_summary(),
            self.index.fixity_failures(),
            self.index.last_audit("tier_run"),
        )

    # -- verbs used by dimse/ (scp.py, find_handler.py, retrieve_handlers.py) --
    def allows(self, service: str, ae_title: str, address: str, local: bool) -> bool:
        """Whether `[access]` lets this caller use `service` ("store", "query" or
        "retrieve"); `local`: it is on the node's own host."""
        return self.config.access.allows(service, ae_title, address, local)

    def find(self, identifier: Dataset, model: str) -> Iterator[Dataset]:
        """A query's answers as Datasets (query.find), naming this node as where to retrieve
        them; raises query.QueryError for a request that cannot be answered."""
        return query.find(self.index, identifier, model, retrieve_ae_title=self.config.ae_title)

    def find_rows(
        self, identifier: Dataset, model: str
    ) -> tuple[query.Plan, Iterator[Sequence[Any]]]:
        """A query's plan and its matches as plain values (query.plan, query.rows), for a
        face that encodes the answers itself; raises query.QueryError as find does."""
        plan = query.plan(self.index, identifier, model, retrieve_ae_title=self.config.ae_title)
        return plan, query.rows(self.index, plan)

    def move_destination(self, ae_title: str) -> tuple[str, int] | None:
        """The host and port of a C-MOVE destination in `[move_destinations]`; None: unknown."""
        return self.config.move_destinations.get(ae_title)


def redact(url: str) -> str:
    """Index URL for messages and logs, without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url


# -- verbs used by service/cli --
@dataclass(frozen=True)
class Problems:
    objects: list[Problem]  # parked and flagged
    patient_conflicts: list[PatientProblem]
    fixity_failures: list[tuple[str, str, str]]  # (tier, blob path, error)
    patient_unverified: list[tuple[str, str | None, str | None]]  # (study, PatientID, name)


@dataclass(frozen=True)
class TierStatus:
    names: list[str]  # the hot tier, then the config's [[tiers]] in order
    by_tier: dict[str, dict[str, Any]]  # instances, bytes received and stored
    backlog: dict[str, int]  # instances due to move there now
    fixity: dict[str, Any]
    fixity_failures: list[tuple[str, str, str]]
    last_run: str | None
