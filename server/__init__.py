"""Wiring and scheduling: the DICOM listener, the job store, analysis workers, delivery, HTTP."""
