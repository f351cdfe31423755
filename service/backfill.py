"""`compacs db upgrade`'s second half: give each study of an index upgraded past revision
0007 the patient attributes of its own objects, read from the archive.

Before 0007 the index held one patient row per PatientID, with the name of whichever object
came first, so only the stored objects know what each study's patient was called. The index
never reads blobs and a migration has no archive, hence this step beside the migration.
Each study is committed on its own (index.backfill_study changes only a study still waiting),
so a run killed half way continues where it stopped when run again, and the index refuses
every other command while studies still wait (schema.check_revision).
"""

from __future__ import annotations

import logging
from io import BytesIO

from pydicom import dcmread
from tqdm import tqdm

from compacs.service.archive_service import ArchiveService

log = logging.getLogger("compacs.backfill")

BATCH = 200  # studies looked up per index read


def backfill_patients(service: ArchiveService, *, progress: bool = True) -> tuple[int, int]:
    """Backfill every study still waiting; returns (studies read, studies none of whose
    objects could be read: they keep the values the old index had, and a log line says
    which)."""
    index = service.index
    read = unreadable = 0
    total = index.backfill_pending()
    if not total:
        return 0, 0
    log.warning("reading the patient attributes of %d studies from their objects", total)
    with tqdm(total=total, desc="patients", unit="study", disable=not progress) as bar:
        while studies := index.studies_to_backfill(BATCH):
            for study_pk, study_uid in studies:
                ds, errors = None, []
                for inst in index.study_header_sources(study_pk):
                    try:
                        blob = service.read_instance(inst)
                        ds = dcmread(BytesIO(blob), stop_before_pixels=True)
                        break
                    except Exception as exc:  # a missing or damaged blob: try another object
                        errors.append(f"{inst.sop_instance_uid}: {exc}")
                if index.backfill_study(study_pk, ds):
                    if ds is None:
                        unreadable += 1
                        log.warning(
                            "study %s: no object could be read (%s); it keeps the patient "
                            "attributes the old index had",
                            study_uid,
                            "; ".join(errors) or "it has no objects",
                        )
                    else:
                        read += 1
                bar.update(1)
    return read, unreadable
