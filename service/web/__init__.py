"""The web face beside dimse/: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) and the status page,
served by uvicorn in a thread of the node process. Every call into the domain goes through
web/domain.py."""
