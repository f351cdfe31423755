"""Tier-move claims: the stored instances a tier policy may move, claimed while they move
(tiering/moves.py), and the move committed in one transaction only if none of them changed
meanwhile."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import case, func, insert, select

from compacs.service.storage.index.blobs import NewBlob, _blob_values, _release_if_unreferenced
from compacs.service.storage.index.claims import _claim_ended
from compacs.service.storage.index.engine import Conflict, Connections
from compacs.service.storage.index.tables import _BLOB, _INSTANCE, _SERIES, _STUDY
from compacs.service.storage.schema import STATE_STORED, utcnow


class MoveClaims(Connections):
    """Stored instances read for a tier policy, claimed, moved, and released."""

    def tier_candidates(self, after_id: int, limit: int) -> list[Any]:
        """Stored instances nobody moves, in id order from `after_id`, with what a tier policy
        and a move need to know of them."""
        now = utcnow()
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(
                        _INSTANCE.c.id,
                        _INSTANCE.c.version,
                        _INSTANCE.c.sop_instance_uid,
                        _STUDY.c.study_instance_uid,
                        _SERIES.c.series_instance_uid,
                        _INSTANCE.c.series_pk,
                        _SERIES.c.modality,
                        _INSTANCE.c.sop_class_uid,
                        _INSTANCE.c.calling_ae,
                        _INSTANCE.c.bits_stored,
                        _INSTANCE.c.number_of_frames,
                        _INSTANCE.c.rows,
                        _INSTANCE.c.columns,
                        _INSTANCE.c.received_at,
                        _INSTANCE.c.accessed_at,
                        _BLOB.c.tier,
                        _BLOB.c.kind,
                        _BLOB.c.path,
                        _INSTANCE.c.blob_offset,
                        _INSTANCE.c.blob_length,
                        _INSTANCE.c.checksum,
                        _INSTANCE.c.frame_first,
                        _INSTANCE.c.codec,
                        _INSTANCE.c.stored_transfer_syntax,
                        _INSTANCE.c.stored_size,
                    )
                    .select_from(_INSTANCE.join(_BLOB).join(_SERIES).join(_STUDY))
                    .where(
                        _INSTANCE.c.id > after_id,
                        _INSTANCE.c.state == STATE_STORED,
                        _INSTANCE.c.claimed_by.is_(None) | (_INSTANCE.c.lease_until < now),
                    )
                    .order_by(_INSTANCE.c.id)
                    .limit(limit)
                ).mappings()
            )

    def series_instances(self, series_pks: list[int]) -> dict[int, tuple[int, int, datetime]]:
        """Per series: instances, how many of them are stored, and the last one's arrival."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    _INSTANCE.c.series_pk,
                    func.count(_INSTANCE.c.id),
                    func.sum(case((_INSTANCE.c.state == STATE_STORED, 1), else_=0)),
                    func.max(_INSTANCE.c.received_at),
                )
                .where(_INSTANCE.c.series_pk.in_(series_pks))
                .group_by(_INSTANCE.c.series_pk)
            )
            return {pk: (n, int(stored or 0), last) for pk, n, stored, last in rows}

    def claim_stored(
        self, wanted: list[tuple[int, int]], owner: str, lease_until: datetime
    ) -> set[int]:
        """Claim stored instances (id, version) to move them; the ids claimed."""
        now = utcnow()
        claimed: set[int] = set()
        with self._write() as conn:
            for instance_id, version in wanted:
                changed = conn.execute(
                    _INSTANCE.update()
                    .where(
                        _INSTANCE.c.id == instance_id,
                        _INSTANCE.c.version == version,
                        _INSTANCE.c.state == STATE_STORED,
                        _INSTANCE.c.claimed_by.is_(None) | (_INSTANCE.c.lease_until < now),
                    )
                    .values(claimed_by=owner, lease_until=lease_until)
                ).rowcount
                if changed:
                    claimed.add(instance_id)
        return claimed

    def renew_move_claims(self, ids: list[int], owner: str, lease_until: datetime) -> None:
        with self._write() as conn:
            conn.execute(
                _INSTANCE.update()
                .where(_INSTANCE.c.id.in_(ids), _INSTANCE.c.claimed_by == owner)
                .values(lease_until=lease_until)
            )

    def unclaim(self, ids: list[int], owner: str) -> None:
        with self._write() as conn:
            conn.execute(
                _INSTANCE.update()
                .where(_INSTANCE.c.id.in_(ids), _INSTANCE.c.claimed_by == owner)
                .values(claimed_by=None, lease_until=None)
            )

    def commit_move(self, owner: str, tier: str, blobs: list[NewBlob], placed: list[Any]) -> bool:
        """Point the moved instances at their new blobs on `tier`, all in one transaction,
        each only if still at the version it was claimed at by `owner`; the old blobs are
        released. False (nothing changed) if any of them changed meanwhile."""
        try:
            with self._write() as conn:
                pks = [
                    conn.execute(insert(_BLOB).values(**_blob_values(b))).inserted_primary_key[0]
                    for b in blobs
                ]
                old = set()
                for p in placed:
                    held = (
                        _INSTANCE.c.id == p.instance_id,
                        _INSTANCE.c.version == p.version,
                        _INSTANCE.c.state == STATE_STORED,
                        _INSTANCE.c.claimed_by == owner,
                    )
                    before = conn.execute(select(_INSTANCE.c.blob_pk).where(*held)).scalar()
                    if before is None:
                        raise Conflict
                    old.add(before)
                    conn.execute(
                        _INSTANCE.update()
                        .where(*held)
                        .values(
                            blob_pk=pks[p.blob],
                            blob_offset=p.offset,
                            blob_length=p.length,
                            checksum=p.checksum,
                            frame_first=p.frame_first,
                            frame_count=None if p.frame_first is None else 1,
                            stored_size=p.stored_size,
                            stored_transfer_syntax=p.transfer_syntax,
                            codec=p.codec,
                            **_claim_ended(p.version),
                        )
                    )
                for blob_pk in old:
                    _release_if_unreferenced(conn, blob_pk)
        except Conflict:
            return False
        return True
