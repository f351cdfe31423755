"""What the archive holds, counted in SQL (`compacs stats`, the metrics' gauges), and the
audit log that records what was done to it and by whom."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, insert, select

from compacs.service.storage.index.engine import Connections
from compacs.service.storage.index.tables import _AUDIT, _BLOB, _INSTANCE, _PATIENT, _SERIES, _STUDY
from compacs.service.storage.schema import (
    PATIENT_UNREADABLE,
    STATE_PARKED,
    STATE_PENDING,
    utcnow,
)


def _totals(count: int, received: int, stored: int) -> dict[str, Any]:
    received, stored = int(received or 0), int(stored or 0)
    return {
        "instances": int(count),
        "bytes_received": received,
        "bytes_stored": stored,
        "ratio": round(received / stored, 3) if stored else None,
    }


class Reports(Connections):
    """Counts of the archive, and the audit log written and read."""

    def state_counts(self) -> dict[str, int]:
        """Pending and parked instances: read through the index on instance.state, so the
        cost grows with those rows, not with the archive (the metrics' gauges)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_INSTANCE.c.state, func.count())
                .where(_INSTANCE.c.state.in_([STATE_PENDING, STATE_PARKED]))
                .group_by(_INSTANCE.c.state)
            )
            return {state: count for state, count in rows}

    def stats(self) -> dict[str, Any]:
        """Totals overall, per modality and per codec, computed in SQL."""
        with self.engine.connect() as conn:
            totals = conn.execute(
                select(
                    func.count(_INSTANCE.c.id),
                    func.coalesce(func.sum(_INSTANCE.c.received_size), 0),
                    func.coalesce(func.sum(_INSTANCE.c.stored_size), 0),
                )
            ).one()

            def count(where: Any) -> int:
                return conn.scalar(select(func.count(_INSTANCE.c.id)).where(where))

            def grouped(column: Any) -> dict[str, dict[str, Any]]:
                rows = conn.execute(
                    select(
                        column,
                        func.count(_INSTANCE.c.id),
                        func.sum(_INSTANCE.c.received_size),
                        func.sum(_INSTANCE.c.stored_size),
                    )
                    .select_from(_INSTANCE.join(_SERIES).join(_BLOB))
                    .group_by(column)
                    .order_by(column)
                )
                return {str(key or "-"): _totals(n, rec, sto) for key, n, rec, sto in rows}

            return {
                **_totals(*totals),
                "studies": conn.scalar(select(func.count(_STUDY.c.id))),
                "pending": count(_INSTANCE.c.state == STATE_PENDING),
                "parked": count(_INSTANCE.c.state == STATE_PARKED),
                "flagged": count(_INSTANCE.c.defects.is_not(None)),
                # PatientIDs (with issuer) whose studies disagree on the name or birth date
                "patient_id_conflicts": conn.scalar(
                    select(func.count()).select_from(
                        select(_PATIENT.c.patient_id, _PATIENT.c.issuer_of_patient_id)
                        .where(_PATIENT.c.patient_id_conflict.is_(True))
                        .distinct()
                        .subquery()
                    )
                ),
                # studies the 0007 upgrade could not re-read: they keep the patient values
                # of the shared row they had, which may be another study's
                "patient_unverified_studies": conn.scalar(
                    select(func.count(_STUDY.c.id)).where(
                        _STUDY.c.patient_source == PATIENT_UNREADABLE
                    )
                ),
                "by_modality": grouped(_SERIES.c.modality),
                "by_codec": grouped(_INSTANCE.c.codec),
                "by_tier": grouped(_BLOB.c.tier),
            }

    def audit(
        self,
        kind: str,
        *,
        sop_uid: str | None = None,
        calling_ae: str | None = None,
        detail: str | None = None,
    ) -> None:
        with self._write() as conn:
            conn.execute(
                insert(_AUDIT).values(
                    at=utcnow(),
                    kind=kind,
                    sop_instance_uid=sop_uid,
                    calling_ae=calling_ae,
                    detail=detail,
                )
            )

    def last_audit(self, kind: str) -> str | None:
        """When and what the last audit event of `kind` said."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(_AUDIT.c.at, _AUDIT.c.detail)
                .where(_AUDIT.c.kind == kind)
                .order_by(_AUDIT.c.id.desc())
                .limit(1)
            ).first()
        return f"{row[0]}: {row[1]}" if row else None
