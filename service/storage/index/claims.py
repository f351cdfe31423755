"""Compression claims: which process compresses which pending instance, and the result it
records only while it still holds the claim at the version it claimed (jobs.py). A claim is
an owner name and a lease: a process that dies leaves leases that run out, and any other
process takes the instances over."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, func, insert, select

from compacs.service.storage.index.blobs import NewBlob, _blob_values, _release_if_unreferenced
from compacs.service.storage.index.engine import Conflict, Connections
from compacs.service.storage.index.tables import _BLOB, _INSTANCE, _SERIES, _STUDY
from compacs.service.storage.schema import (
    STATE_PARKED,
    STATE_PENDING,
    STATE_STORED,
    utcnow,
)


class Claim(NamedTuple):
    """A pending instance this process compresses: what the job needs, and the version the
    result must still find."""

    instance_id: int
    sop_instance_uid: str
    version: int
    blob_path: str
    checksum: str
    calling_ae: str | None
    study_instance_uid: str
    series_instance_uid: str


def _held(claim: Claim, owner: str) -> tuple[Any, ...]:
    return (
        _INSTANCE.c.id == claim.instance_id,
        _INSTANCE.c.version == claim.version,
        _INSTANCE.c.state == STATE_PENDING,
        _INSTANCE.c.claimed_by == owner,
    )


def _claim_ended(version: int) -> dict[str, Any]:
    """What a finished claim writes (a result recorded, a move committed): no owner, no
    lease, and the next version, so that a late result of the same claim finds it changed."""
    return {"claimed_by": None, "lease_until": None, "version": version + 1}


class CompressionClaims(Connections):
    """Pending instances claimed, renewed, released, and their results recorded."""

    def claim_pending(
        self, owner: str, lease_until: datetime, limit: int = 500, *, own_too: bool = False
    ) -> list[Claim]:
        """Claim pending instances nobody holds (never claimed, or their lease ran out: the
        process died), oldest first; with `own_too` also those this owner name holds (a
        restart: owner names are host and port, so the holder was this node's previous
        life). SKIP LOCKED on PostgreSQL: two processes claiming at once get different rows;
        SQLite has one writer."""
        now = utcnow()
        holder = _INSTANCE.c.claimed_by.is_(None) | (_INSTANCE.c.lease_until < now)
        if own_too:
            holder = holder | (_INSTANCE.c.claimed_by == owner)
        free = (_INSTANCE.c.state == STATE_PENDING) & holder
        pick = select(_INSTANCE.c.id).where(free).order_by(_INSTANCE.c.id).limit(limit)
        if self.engine.dialect.name == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        with self._write() as conn:
            ids = [row[0] for row in conn.execute(pick)]
            if not ids:
                return []
            claimed = [
                row[0]
                for row in conn.execute(
                    _INSTANCE.update()
                    .where(_INSTANCE.c.id.in_(ids), free)
                    .values(claimed_by=owner, lease_until=lease_until)
                    .returning(_INSTANCE.c.id)
                )
            ]
            return _claims(conn, claimed)

    def renew_claims(self, owner: str, lease_until: datetime) -> int:
        """Extend this process' claims: it is alive."""
        with self._write() as conn:
            return conn.execute(
                _INSTANCE.update()
                .where(_INSTANCE.c.claimed_by == owner, _INSTANCE.c.state == STATE_PENDING)
                .values(lease_until=lease_until)
            ).rowcount

    def release_claims(self, owner: str) -> int:
        """At a clean stop: let any process take this one's pending instances at once."""
        with self._write() as conn:
            return conn.execute(
                _INSTANCE.update()
                .where(_INSTANCE.c.claimed_by == owner, _INSTANCE.c.state == STATE_PENDING)
                .values(claimed_by=None, lease_until=None)
            ).rowcount

    def still_claimed(self, claim: Claim, owner: str) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(select(_INSTANCE.c.id).where(*_held(claim, owner))).first() is not None
            )

    def mark_stored(
        self, claim: Claim, owner: str, blob: NewBlob, *, flag: str | None = None, **fields: Any
    ) -> bool:
        """Record the compressed form in its new blob; False (nothing changed) if this process
        no longer holds the claim at that version (replaced, or taken over after its lease
        ran out). The received blob is released. `flag`: a defect found by the job (pixels
        that do not decode), added to those ingest found."""
        if flag:
            fields["defects"] = func.coalesce(_INSTANCE.c.defects + "; ", "") + flag
        try:
            self._mark_stored(claim, owner, blob, fields)
        except Conflict:
            return False
        return True

    def _mark_stored(self, claim: Claim, owner: str, blob: NewBlob, fields: dict[str, Any]) -> None:
        with self._write() as conn:
            old_blob = conn.execute(
                select(_INSTANCE.c.blob_pk).where(_INSTANCE.c.id == claim.instance_id)
            ).scalar()
            blob_pk = conn.execute(insert(_BLOB).values(**_blob_values(blob))).inserted_primary_key[
                0
            ]
            changed = conn.execute(
                _INSTANCE.update()
                .where(*_held(claim, owner))
                .values(
                    state=STATE_STORED,
                    stored_at=utcnow(),
                    blob_pk=blob_pk,
                    blob_offset=0,
                    blob_length=blob.size,
                    checksum=blob.checksum,
                    stored_size=blob.size,
                    **_claim_ended(claim.version),
                    **fields,
                )
            ).rowcount
            if changed != 1:
                raise Conflict
            _release_if_unreferenced(conn, old_blob)

    def record_failure(self, claim: Claim, owner: str, error: str, max_attempts: int) -> str | None:
        """Count a failed compression attempt: the state afterwards (pending, or parked after
        `max_attempts`: the claim ends), or None if this process no longer holds the claim."""
        with self._write() as conn:
            attempts = conn.execute(
                select(_INSTANCE.c.attempts).where(*_held(claim, owner))
            ).scalar()
            if attempts is None:
                return None
            parked = attempts + 1 >= max_attempts
            conn.execute(
                _INSTANCE.update()
                .where(*_held(claim, owner))
                .values(
                    attempts=attempts + 1,
                    last_error=error[:2000],
                    state=STATE_PARKED if parked else STATE_PENDING,
                    **({"claimed_by": None, "lease_until": None} if parked else {}),
                )
            )
            return STATE_PARKED if parked else STATE_PENDING


def _claims(conn: Connection, ids: list[int]) -> list[Claim]:
    if not ids:
        return []
    rows = conn.execute(
        select(
            _INSTANCE.c.id,
            _INSTANCE.c.sop_instance_uid,
            _INSTANCE.c.version,
            _BLOB.c.path,
            _INSTANCE.c.checksum,
            _INSTANCE.c.calling_ae,
            _STUDY.c.study_instance_uid,
            _SERIES.c.series_instance_uid,
        )
        .select_from(_INSTANCE.join(_BLOB).join(_SERIES).join(_STUDY))
        .where(_INSTANCE.c.id.in_(ids))
        .order_by(_INSTANCE.c.id)
    )
    return [Claim(*row) for row in rows]
