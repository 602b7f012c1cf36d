"""Errors of the model stages."""

from lungscreen.dicom_io.errors import LungScreenError


class ModelError(LungScreenError):
    """A model or its card is unusable, or inference failed."""
