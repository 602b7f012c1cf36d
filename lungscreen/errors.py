"""The one error hierarchy of LungScreen.

One root, :class:`LungScreenError`, so the server can tell an expected, recorded outcome (a
study that is not eligible, a volume that cannot be assembled, a model that cannot be used)
from a bug. Every stage raises these; none defines a root of its own.
"""


class LungScreenError(Exception):
    """Root of all errors LungScreen raises on purpose."""


class ConfigurationError(LungScreenError):
    """A setting, a model card or a file a setting names is unusable; the server does not start."""


class NotEligible(LungScreenError):
    """The study holds nothing to analyse (no suitable CT series); a recorded outcome."""


class VolumeError(LungScreenError):
    """A series cannot be assembled into a trustworthy 3D volume."""


class ModelError(LungScreenError):
    """A model or its card is unusable, or inference failed."""


class ReportError(LungScreenError):
    """The structured report cannot be built from the evidence."""


class DeliveryError(LungScreenError):
    """A result could not be delivered; ``permanent`` tells whether retrying can help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
