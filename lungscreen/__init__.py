"""LungScreen: a DICOM inference server for lung-nodule screening on chest CT.

Research use only, not for diagnostic use. One import package: ``lungscreen.dicom_io``
(DICOM in and out), ``lungscreen.models`` (analysis on arrays), ``lungscreen.server``
(wiring and scheduling), ``lungscreen.training`` and ``lungscreen.benchmarks``.
"""

__version__ = "0.2.0"
