"""The DICOM network face: SCP handlers, SCU, C-GET/C-MOVE sub-operations, and every module
that reaches into pynetdicom's internals."""
