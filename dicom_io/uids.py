"""DICOM UID validation (PS3.5 section 9.1).

A UID received from the network becomes part of a file path only after it passed
:func:`is_valid_uid`, so ``../`` or other crafted values can never escape the data folder.
"""

import re

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid UID: digits and dots, no leading zeros, at most 64 chars."""
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None
