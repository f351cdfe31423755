"""Blob lifecycle and fixity: a blob is indexed when written, released (never deleted in the
same transaction) when no instance points at it any more, deleted by the sweep once nothing
in flight can still read it, and checked against its checksum by the fixity job."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select

from compacs.service.storage.index.engine import Connections
from compacs.service.storage.index.tables import _BLOB, _INSTANCE
from compacs.service.storage.schema import KIND_INSTANCE, utcnow


@dataclass(frozen=True)
class NewBlob:
    """A blob just written durably, to be indexed."""

    path: str
    size: int
    checksum: str
    tier: str = "hot"
    kind: str = KIND_INSTANCE


def _blob_values(blob: NewBlob) -> dict[str, Any]:
    return {
        "tier": blob.tier,
        "path": blob.path,
        "kind": blob.kind,
        "size": blob.size,
        "checksum": blob.checksum,
        "created_at": utcnow(),
    }


def _release_if_unreferenced(conn: Connection, blob_pk: int | None) -> None:
    if blob_pk is None:
        return
    conn.execute(
        _BLOB.update()
        .where(
            _BLOB.c.id == blob_pk,
            ~select(_INSTANCE.c.id).where(_INSTANCE.c.blob_pk == blob_pk).exists(),
        )
        .values(released_at=utcnow())
    )


class BlobRecords(Connections):
    """The blob rows: what the sweep may delete and what the fixity job checks."""

    def record_fixity(self, blob_pk: int, error: str | None) -> None:
        with self._write() as conn:
            conn.execute(
                _BLOB.update()
                .where(_BLOB.c.id == blob_pk)
                .values(verified_at=utcnow(), fixity_error=error)
            )

    def fixity_due(self, before: datetime, limit: int) -> list[tuple[int, str, str, str, str]]:
        """Blobs (id, tier, path, checksum, kind) held and not checked since `before`."""
        rows = self._rows(
            select(_BLOB.c.id, _BLOB.c.tier, _BLOB.c.path, _BLOB.c.checksum, _BLOB.c.kind)
            .where(
                _BLOB.c.released_at.is_(None),
                _BLOB.c.verified_at.is_(None) | (_BLOB.c.verified_at < before),
            )
            .order_by(_BLOB.c.verified_at.is_not(None), _BLOB.c.verified_at, _BLOB.c.id)
            .limit(limit)
        )
        return [tuple(row) for row in rows]

    def fixity_summary(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            held = _BLOB.c.released_at.is_(None)
            total, checked, failed, oldest = conn.execute(
                select(
                    func.count(_BLOB.c.id),
                    func.count(_BLOB.c.verified_at),
                    func.count(_BLOB.c.fixity_error),
                    func.min(_BLOB.c.verified_at),
                ).where(held)
            ).one()
        return {"blobs": total, "checked": checked, "failed": failed, "oldest_check": oldest}

    def fixity_failures(self) -> list[tuple[str, str, str]]:
        """Blobs (tier, path, error) whose last fixity check failed."""
        rows = self._rows(
            select(_BLOB.c.tier, _BLOB.c.path, _BLOB.c.fixity_error)
            .where(_BLOB.c.fixity_error.is_not(None), _BLOB.c.released_at.is_(None))
            .order_by(_BLOB.c.id)
        )
        return [tuple(row) for row in rows]

    def kept_undecodable(self, blob_pk: int) -> bool:
        """Whether the blob holds an instance kept as received and flagged: its pixels not
        decoding is then a known defect of what was received, not damage (fixity)."""
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(_INSTANCE.c.id).where(
                        _INSTANCE.c.blob_pk == blob_pk,
                        _INSTANCE.c.defects.is_not(None),
                        _INSTANCE.c.codec == "passthrough",
                    )
                ).first()
                is not None
            )

    def blob_paths(self) -> set[str]:
        """Every blob the index knows, released ones included: a file that is not among them
        and older than any job in flight is an orphan."""
        with self.engine.connect() as conn:
            return {path for (path,) in conn.execute(select(_BLOB.c.path))}

    def released_blobs(self, before: datetime) -> list[tuple[int, str, str]]:
        """Blobs (id, tier, path) released before `before` that no instance points at: safe
        to delete."""
        rows = self._rows(
            select(_BLOB.c.id, _BLOB.c.tier, _BLOB.c.path).where(
                _BLOB.c.released_at < before,
                ~select(_INSTANCE.c.id).where(_INSTANCE.c.blob_pk == _BLOB.c.id).exists(),
            )
        )
        return [tuple(row) for row in rows]

    def forget_blob(self, blob_pk: int) -> None:
        """Drop the row of a released blob whose file the sweep has deleted."""
        with self._write() as conn:
            conn.execute(
                _BLOB.delete().where(_BLOB.c.id == blob_pk, _BLOB.c.released_at.is_not(None))
            )
