"""Reconstruction kernels: a vendor's kernel name to a soft or sharp family.

The convolution kernel (filter) a CT series was reconstructed with sets its noise texture
and edge sharpness; a detector trained on one family sees the other as out of distribution.
ConvolutionKernel (0018,1210) is free text, named by each vendor's convention, so the family
is read from those conventions; the Enhanced CT ConvolutionKernelGroup (0018,9316; PS3.3
C.8.15.3.6, defined terms BRAIN, SOFT_TISSUE, LUNG, BONE, CONSTANT_ANGLE) is used first
where it is present. A name no convention covers has no family (``None``): it is neither
preferred nor avoided.

Conventions (the vendors' reconstruction manuals; the families are those of kernel
harmonisation studies):

* Siemens: a letter (B body, H head, I/Q/J iterative, D dual energy...), optionally a
  second letter for the type (``r`` regular, ``l`` lung, ``s`` smooth...), two digits for
  the sharpness, optionally a letter: B30f, B70f, Br40d, Bl57d, I70f. Lung types and
  sharpness 45 or more are sharp; the rest soft.
* GE: words: SOFT, STANDARD (soft); DETAIL, LUNG, BONE, BONEPLUS, EDGE, ULTRA (sharp).
* Philips: letters: A, B (soft); C, D, E, L and the Y kernels YA, YB, YC, YD (sharp).
* Canon / Toshiba: FC and two digits: FC01-FC29 (body and head, soft), FC30 and above
  (bone, lung and high-resolution: FC30, FC51, FC52, FC86; sharp).
* Names in words (Canon AiCE "LUNG" / "BODY SHARP", United Imaging "B_SOFT_B" / "L_LUNG",
  Philips IMR "SharpPlus" / "SoftTissue"): a word for lung, bone, sharp or detail makes it
  sharp, else a word for soft, standard, smooth or body makes it soft.
"""

from __future__ import annotations

import re
from enum import StrEnum

import pydicom
from pydicom.multival import MultiValue


class KernelFamily(StrEnum):
    """The two families a model card may prefer (``preferred_kernel`` in the card schema)."""

    SOFT = "soft"  # smooth, standard, soft-tissue, body: low noise, the mediastinal window's kernel
    SHARP = "sharp"  # lung, bone, high resolution: sharp edges, high noise


_GROUPS = {"LUNG": KernelFamily.SHARP, "BONE": KernelFamily.SHARP,
           "SOFT_TISSUE": KernelFamily.SOFT, "BRAIN": KernelFamily.SOFT}
_SIEMENS = re.compile(r"^[A-Z]([A-Z])?(\d{2})[A-Z]?$")
_CANON = re.compile(r"^FC(\d{2})$")
_PHILIPS = {"A": KernelFamily.SOFT, "B": KernelFamily.SOFT, "C": KernelFamily.SHARP, "D": KernelFamily.SHARP,
            "E": KernelFamily.SHARP, "L": KernelFamily.SHARP, "YA": KernelFamily.SHARP, "YB": KernelFamily.SHARP,
            "YC": KernelFamily.SHARP, "YD": KernelFamily.SHARP}
_SHARP_WORDS = {"LUNG", "LUNGS", "BONE", "BONEPLUS", "SHARP", "SHARPPLUS", "DETAIL", "EDGE", "ULTRA"}
_SOFT_WORDS = {"SOFT", "SOFTTISSUE", "STANDARD", "SMOOTH", "BODY", "ROUTINE", "MEDIASTINUM"}
_SIEMENS_SHARP_FROM = 45  # B45f and above; Br40 / B30f / B31f are the soft body kernels


def kernel_family(kernel: str, group: str = "") -> KernelFamily | None:
    """The family of a kernel named ``kernel`` (the first value of ConvolutionKernel) in the
    conventions above, or of its ConvolutionKernelGroup ``group``; ``None`` when unknown."""
    if group.strip().upper() in _GROUPS:
        return _GROUPS[group.strip().upper()]
    name = kernel.strip().upper()
    if match := _CANON.match(name):
        return KernelFamily.SOFT if int(match[1]) < 30 else KernelFamily.SHARP
    if name in _PHILIPS:
        return _PHILIPS[name]
    if match := _SIEMENS.match(name):
        lung_type = match[1] == "L"
        return KernelFamily.SHARP if lung_type or int(match[2]) >= _SIEMENS_SHARP_FROM else KernelFamily.SOFT
    words = set(re.split(r"[^A-Z0-9]+", name))
    if words & _SHARP_WORDS:
        return KernelFamily.SHARP
    if words & _SOFT_WORDS:
        return KernelFamily.SOFT
    return None


def series_kernel(header: pydicom.Dataset) -> tuple[str, str]:
    """``(ConvolutionKernel, ConvolutionKernelGroup)`` of an instance, ``""`` where absent.

    CT Image Storage keeps the kernel at the top level (CT Image module, PS3.3 C.8.2.1);
    Enhanced CT in the CT Reconstruction functional group (C.8.15.3.6), shared or per frame
    (the first frame speaks for the instance); Legacy Converted Enhanced CT among the
    unassigned converted attributes (macros of C.7.6.16.2). Only the first value of a multi-valued
    kernel names it: Siemens adds the iterative strength (``Br40d\\3``), Canon the reconstruction.
    """
    groups = [header]
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        sequence = header.get(keyword)
        if sequence:
            for macro in ("CTReconstructionSequence", "UnassignedSharedConvertedAttributesSequence",
                          "UnassignedPerFrameConvertedAttributesSequence"):
                if sequence[0].get(macro):
                    groups.append(sequence[0].get(macro)[0])
    kernel = group = ""
    for item in groups:
        kernel = kernel or _first_value(item.get("ConvolutionKernel"))
        group = group or _first_value(item.get("ConvolutionKernelGroup"))
    return kernel, group


def _first_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return str(value[0]).strip() if len(value) else ""
    return str(value).strip()
