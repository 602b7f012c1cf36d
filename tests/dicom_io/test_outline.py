"""Tests of dicom_io.outline: which findings are drawn, and where (real LIDC-IDRI-0001 geometry)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lidc_reports import lidc_findings
from lungscreen.dicom_io.outline import (
    DEFAULT_OUTLINE_CATEGORIES,
    check_outline_categories,
    finding_slice,
    is_outlined,
    nodule_outline,
)
from lungscreen.errors import ReportError


@pytest.fixture(scope="module")
def findings(lidc_volume):
    return lidc_findings(lidc_volume, small_kji=(40.0, 300.0, 150.0))  # Lung-RADS 4B and 2


def test_default_outlines_lung_rads_3_and_above(findings):
    assert DEFAULT_OUTLINE_CATEGORIES == ("3", "4A", "4B", "4X")
    luna, small = findings
    assert is_outlined(luna, DEFAULT_OUTLINE_CATEGORIES)
    assert not is_outlined(small, DEFAULT_OUTLINE_CATEGORIES)
    assert is_outlined(small, ("2",))


@pytest.mark.parametrize(("categories", "error"), [(["3", "5"], ValueError), ("4A", TypeError), (None, TypeError)])
def test_rejects_unknown_categories(categories, error):
    with pytest.raises(error, match="outline_categories"):
        check_outline_categories(categories)


def test_finding_slice_and_outline(lidc_headers, lidc_volume, findings):
    headers = {h.SOPInstanceUID: h for h in lidc_headers}
    at = finding_slice(findings[1], lidc_volume, headers, "nodule 2")
    assert at.index == 40 and at.header.SOPInstanceUID == lidc_volume.slices[40].sop_instance_uid
    points = nodule_outline(findings[1], lidc_volume, at.header)
    assert (points[0] == points[-1]).all() and len(points) == 33
    with pytest.raises(ReportError, match="nodule 2: centre .* outside the image"):
        finding_slice(replace(findings[1], center_kji=(40.0, 300.0, 600.0)), lidc_volume, headers, "nodule 2")
    with pytest.raises(ReportError, match="not among the evidence"):
        finding_slice(findings[1], lidc_volume, {}, "nodule 2")
