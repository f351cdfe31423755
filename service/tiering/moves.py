"""Where a tier move happens: which objects are due, and moving them.

A move: claim the instances (owner and lease, as compression jobs do, so that two nodes never
move the same object), recompress and verify them bit-exact in a low-priority worker
process (recompress.py), write the new blob durably on the tier's root, switch the index rows
in one transaction (only if each is still at the version it was claimed at), release the old
blob (the sweep deletes it after the grace period, once no C-GET may still read it). Killed
at any point, it leaves the old or the new copy fully valid, never neither; the next run
takes up what is still due.

Which tier: tiers are listed warm to cold; an object goes to the coldest tier it is due for
(received, or last retrieved, `after_days` ago, and matching its `match`) and never back to a
warmer one. With `form = "volume"`, a series of single-frame slices of one geometry whose
instances are all due, stored and not still arriving (no new instance for `[tiering]
stable_minutes`) is packed as one series volume; an instance arriving in a series already
packed on that tier moves on its own, as do multi-frame instances (a volume by themselves).

The share of the CPU is bounded twice: the worker runs at nice 19, and after each move the
run pauses so that its busy time stays within `[tiering] cpu_share` of one core.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, TimeoutError
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from tqdm import tqdm

from compacs.service import metrics
from compacs.service.storage.index import NewBlob
from compacs.service.storage.schema import HOT_TIER, utcnow
from compacs.service.tiering import recompress
from compacs.service.tiering.policy import Tier

log = logging.getLogger("compacs.tiering")

PAGE = 2000


@dataclass
class Move:
    tier: Tier
    kind: str  # "instance" | "series"
    rows: list[Any]  # index rows (tier_candidates)


@dataclass
class RunReport:
    moved: int = 0  # instances
    series_packed: int = 0
    failed: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    by_tier: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    interrupted: bool = False

    def line(self) -> str:
        saved = self.bytes_before - self.bytes_after
        return (
            f"{self.moved} instance(s) moved ({self.series_packed} series packed as volumes), "
            f"{len(self.failed)} failed, {self.bytes_before} -> {self.bytes_after} bytes "
            f"({saved} saved) in {self.seconds:.1f} s"
            + (" (interrupted)" if self.interrupted else "")
        )


def _attrs(row: Any) -> dict[str, Any]:
    return {
        "Modality": row.modality,
        "SOPClassUID": row.sop_class_uid,
        "CallingAETitle": (row.calling_ae or "").strip(),
        "BitsStored": row.bits_stored,
        "NumberOfFrames": row.number_of_frames or 1,
    }


def target_tier(tiers: list[Tier], row: Any, now: datetime) -> Tier | None:
    """The coldest tier `row` is due for and colder than where it is; None: stays."""
    ranks = {HOT_TIER: 0, **{t.name: i + 1 for i, t in enumerate(tiers)}}
    current = ranks.get(row.tier)
    if current is None:
        return None  # a tier no longer configured: left where it is
    for rank in range(len(tiers), current, -1):
        tier = tiers[rank - 1]
        since = row.accessed_at or row.received_at if tier.since == "accessed" else row.received_at
        if _aware(since) < tier.due_before(now) and tier.matches(_attrs(row)):
            return tier
    return None


def _aware(moment: datetime) -> datetime:
    """SQLite gives timestamps back without their zone (all are written in UTC)."""
    from datetime import UTC

    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def plan(service: Any, now: datetime, limit: int) -> list[Move]:
    """The moves due at `now`, at most `limit` instances' worth."""
    tiers = service.tiers
    stable = timedelta(minutes=service.tiering.stable_minutes)
    due: dict[tuple[str, int], list[Any]] = defaultdict(list)  # (tier, series) -> rows
    tier_of: dict[str, Tier] = {t.name: t for t in tiers}
    after, count = 0, 0
    while count < limit:
        rows = service.tier_candidates(after, PAGE)
        if not rows:
            break
        after = rows[-1].id
        for row in rows:
            tier = target_tier(tiers, row, now)
            if tier is not None:
                due[(tier.name, row.series_pk)].append(row)
                count += 1
    moves: list[Move] = []
    series = service.series_instances(list({pk for _t, pk in due}))
    for (name, series_pk), rows in due.items():
        tier = tier_of[name]
        total, stored, last = series.get(series_pk, (0, 0, now))
        packable = (
            tier.form == "volume"
            and len(rows) > 1
            and len(rows) == total == stored
            and _aware(last) < now - stable
            and len({(r.rows, r.columns, r.bits_stored) for r in rows}) == 1
            and all((r.number_of_frames or 1) == 1 for r in rows)
        )
        if packable:
            moves.append(Move(tier, "series", rows))
        else:
            moves.extend(Move(tier, "instance", [row]) for row in rows)
    return moves


def _task(service: Any, move: Move) -> recompress.Task:
    sources = tuple(
        recompress.Source(
            r.id,
            r.version,
            r.sop_instance_uid,
            r.study_instance_uid,
            r.series_instance_uid,
            service.archive_for(r.tier).spec,
            r.path,
            r.blob_offset,
            r.blob_length,
            r.checksum,
            r.frame_first,
            r.codec,
            r.stored_transfer_syntax,
            r.stored_size,
        )
        for r in move.rows
    )
    store = service.archive_for(move.tier.name).spec
    return recompress.Task(
        move.kind, move.tier.name, store, move.tier.codecs, move.tier.choose, sources
    )


def worker_pool(log_format: str = "text") -> Executor:
    """One worker process at the lowest priority (recompress.init_worker), logging in the
    node's [logging] format."""
    return ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=recompress.init_worker,
        initargs=(log_format,),
    )


def run_due(
    service: Any,
    owner: str,
    now: datetime | None = None,
    *,
    limit: int = 5000,
    progress: bool = False,
    executor: Executor | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> RunReport:
    """Move what is due at `now` (default: now): the work of `compacs tier run` and of the
    scheduled job. Goes on past a move that fails, and reports it."""
    started = time.monotonic()
    report = RunReport()
    now = now or utcnow()
    moves = plan(service, now, limit)
    due: dict[str, int] = {tier.name: 0 for tier in service.tiers}
    for move in moves:
        due[move.tier.name] += len(move.rows)
    if not moves:
        _backlog(due, report)
        return report
    own = executor is None
    executor = executor or worker_pool(service.worker_log_format)
    share = service.tiering.cpu_share
    try:
        bar = tqdm(moves, desc="tier run", unit="move", disable=not progress)
        for move in bar:
            if stop():
                break
            ids = [(r.id, r.version) for r in move.rows]
            claimed = service.claim_for_move(ids, owner)  # renewed while the move runs
            if len(claimed) != len(ids):  # another node or a re-send took some
                service.unclaim(list(claimed), owner)
                continue
            begun = time.monotonic()
            try:
                output = _wait(
                    executor.submit(recompress.run, _task(service, move)), service, owner, claimed
                )
            except KeyboardInterrupt:  # Ctrl-C: this move is given up, the rest waits
                service.unclaim(list(claimed), owner)
                report.interrupted = True
                break
            except Exception as exc:
                service.unclaim(list(claimed), owner)
                sops = ", ".join(r.sop_instance_uid for r in move.rows[:3])
                report.failed.append(f"{move.kind} {sops}: {type(exc).__name__}: {exc}")
                log.error("tier move to %s failed (%s): %s", move.tier.name, sops, exc)
                if isinstance(exc, BrokenProcessPool) and own:
                    # Its worker died (a codec crash) running this move alone: the move is
                    # the culprit; the moves after it get a fresh worker, not a broken pool.
                    executor.shutdown(wait=False)
                    executor = worker_pool(service.worker_log_format)
                continue
            _commit(service, owner, move, output, report)
            busy = time.monotonic() - begun
            if share < 1:
                time.sleep(busy * (1 - share) / share)  # keep to the share of one core
    finally:
        if own:
            executor.shutdown(wait=True, cancel_futures=True)
    report.seconds = time.monotonic() - started
    _backlog(due, report)
    service.audit("tier_run", detail=report.line())
    log.info("tier run: %s", report.line())
    return report


def _backlog(due: dict[str, int], report: RunReport) -> None:
    """compacs_tier_backlog_instances: what this run found due and did not move."""
    for tier, count in due.items():
        metrics.TIER_BACKLOG.labels(tier).set(max(0, count - report.by_tier.get(tier, 0)))


def _wait(future: Future, service: Any, owner: str, claimed: set[int]) -> recompress.Output:
    """The move's result; its claims renewed meanwhile, so that they hold while this run
    lives and run out soon after it is killed (another run then takes the objects)."""
    while True:
        try:
            return future.result(timeout=max(0.2, service.lease_seconds / 3))
        except TimeoutError:
            service.renew_move_claims(list(claimed), owner)


def _commit(
    service: Any, owner: str, move: Move, output: recompress.Output, report: RunReport
) -> None:
    archive = service.archive_for(move.tier.name)
    blobs = [
        NewBlob(path, size, digest, move.tier.name, kind)
        for path, size, digest, kind in output.blobs
    ]
    if not service.commit_move(owner, move.tier.name, blobs, list(output.placed)):
        for path, *_ in output.blobs:  # the objects changed meanwhile: ours belongs to none
            archive.delete(path)
        service.unclaim([r.id for r in move.rows], owner)
        log.info("tier move to %s discarded: the objects changed meanwhile", move.tier.name)
        return
    log.info(
        "moved %d instance(s) to %s as %s%s",
        len(move.rows),
        move.tier.name,
        output.placed[0].codec,
        f" ({'; '.join(output.notes)})" if output.notes else "",
    )
    report.moved += len(move.rows)
    report.series_packed += move.kind == "series"
    report.by_tier[move.tier.name] += len(move.rows)
    report.bytes_before += sum(r.stored_size for r in move.rows)
    report.bytes_after += sum(size for _p, size, _d, _k in output.blobs)
