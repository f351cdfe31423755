"""APScheduler inside `compacs serve`: the tier run and fixity, on their schedules.

The job store is in the SQL index (APScheduler's SQLAlchemy job store), so the next run time
survives a restart, and a job missed while the node was down runs once when it is back
(coalesced), never twice. APScheduler 3 does not share one job store between schedulers,
so each node has its own table (named after its claim owner); two nodes on one index may run
the same kind of job at once, which is safe: each move and each compression claims its rows
first (moves.py), so no object is ever moved twice.

A job's function must be importable by name (the job store keeps a reference, not the
object): the running service is registered here at start.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger("compacs.scheduler")

_running: dict[str, Any] = {}


def tier_job() -> None:
    service = _running.get("service")
    if service is not None:
        service.tier_run()


def fixity_job() -> None:
    service = _running.get("service")
    if service is not None:
        service.fixity_run()


def start(service: Any, owner: str) -> Any:
    """Start the node's scheduler (None when no job is scheduled)."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    tiering = service.tiering
    jobs = []
    if service.tiers and tiering.every_minutes > 0:
        jobs.append(("tier-run", tier_job, tiering.every_minutes * 60))
    if tiering.fixity_every_hours > 0:
        jobs.append(("fixity", fixity_job, tiering.fixity_every_hours * 3600))
    if not jobs:
        return None
    _running["service"] = service
    table = "apscheduler_" + re.sub(r"[^a-z0-9]+", "_", owner.lower())[:40]
    store = SQLAlchemyJobStore(engine=service.job_store_engine(), tablename=table)
    scheduler = BackgroundScheduler(
        jobstores={"default": store},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
        timezone="UTC",
    )
    scheduler.start(paused=True)
    for job_id, func, seconds in jobs:
        kept = scheduler.get_job(job_id)
        # a job kept from before the restart keeps its next run time, unless its period changed
        if kept is None or kept.trigger.interval.total_seconds() != seconds:
            scheduler.add_job(func, "interval", seconds=seconds, id=job_id, replace_existing=True)
    scheduler.resume()
    log.info(
        "scheduled: %s (job store: table %s of the index)",
        ", ".join(f"{job_id} every {seconds / 60:g} min" for job_id, _f, seconds in jobs),
        table,
    )
    return scheduler


def stop(scheduler: Any) -> None:
    if scheduler is not None:
        scheduler.shutdown(wait=True)
    _running.pop("service", None)
