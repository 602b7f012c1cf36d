"""Exceptions shared by every LungScreen stage.

One root, :class:`LungScreenError`, so the server can tell an expected, recorded outcome
(a study that is not eligible, a volume that cannot be assembled) from a bug.
"""


class LungScreenError(Exception):
    """Root of all errors LungScreen raises on purpose."""


class NotEligible(LungScreenError):
    """The study holds nothing to analyse (no suitable CT series); a recorded outcome."""


class VolumeError(LungScreenError):
    """A series cannot be assembled into a trustworthy 3D volume."""


class ReportError(LungScreenError):
    """The structured report cannot be built from the evidence."""


class DeliveryError(LungScreenError):
    """A result could not be delivered; ``permanent`` tells whether retrying can help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
