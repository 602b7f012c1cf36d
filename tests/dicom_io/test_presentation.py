"""Tests of dicom_io.presentation: the GSPS on the real LIDC-IDRI-0001 series (headers only)."""

from __future__ import annotations

import copy
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage, generate_uid

from lungscreen.errors import ReportError, VolumeError
from lungscreen.dicom_io.presentation import (
    CONTENT_LABEL,
    GRAPHIC_LAYER,
    GSPS_SOP_CLASS_UID,
    LUNG_WINDOW,
    build_gsps,
    key_slice,
)
from lungscreen.dicom_io.sr import RESEARCH_USE_NOTICE, finding_label
from lungscreen.dicom_io.volume import CT_SOP_CLASSES
from lidc_reports import LUNA16_NODULE_DIAMETER, LUNA16_NODULE_LPS, algorithm, dciodvfy, lidc_findings, nodule_report
from lungscreen.findings import Finding


@pytest.fixture(scope="module")
def findings(lidc_volume) -> tuple[Finding, Finding]:
    return lidc_findings(lidc_volume, small_kji=(40.0, 5.0, 150.0))  # near the top edge: the label goes below


def _roundtrip(dataset) -> pydicom.Dataset:
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


def _dciodvfy(tmp_path: Path, dataset: pydicom.Dataset) -> None:
    path = tmp_path / "gsps.dcm"
    pydicom.dcmwrite(path, dataset, enforce_file_format=True)
    dciodvfy(path)


# A site that also outlines Lung-RADS 2 findings (the default lists them only), so that both
# findings are drawn.
OUTLINE_ALL = ("1", "2", "3", "4A", "4B", "4X")


@pytest.fixture(scope="module")
def gsps(lidc_headers, lidc_volume, findings) -> pydicom.Dataset:
    return _roundtrip(
        build_gsps(
            lidc_headers, lidc_volume, nodule_report(findings), algorithm=algorithm(), outline_categories=OUTLINE_ALL
        )
    )


class TestFindingLabel:
    def test_reads_like_a_radiologist_label(self):
        assert finding_label(1, 23.35, 0.913, "4B") == "Nodule 1 · 23.4 mm · p 0.91 · Lung-RADS 4B"

    @pytest.mark.parametrize("number", [0, -1, True, 1.0])
    def test_rejects_number(self, number):
        with pytest.raises(ValueError, match="number"):
            finding_label(number, 5.0, 0.5, "2")


class TestBuildGSPS:
    def test_an_outline_at_the_edge_of_the_image_is_clipped_to_it(self, lidc_headers, lidc_volume, findings):
        # Found by fuzzing the pipeline: highdicom refused a circle reaching past column 0.
        at_edge = Finding(**(vars(findings[1]) | {"center_kji": (40.0, 250.0, 1.0), "diameter_mm": 20.0}))
        gsps = _roundtrip(
            build_gsps(
                lidc_headers, lidc_volume, nodule_report((at_edge,)), algorithm=algorithm(),
                outline_categories=OUTLINE_ALL,
            )
        )
        (annotation,) = gsps.GraphicAnnotationSequence
        points = np.asarray(annotation.GraphicObjectSequence[0].GraphicData, dtype=float).reshape(-1, 2)
        assert points[:, 0].min() == 0.0 and points[:, 0].max() <= lidc_headers[0].Columns
        assert 0.0 <= points[:, 1].min() and points[:, 1].max() <= lidc_headers[0].Rows

    def test_is_a_gsps_in_the_ct_study_and_not_a_ct_class(self, gsps, lidc_headers):
        assert gsps.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage == GSPS_SOP_CLASS_UID
        assert GSPS_SOP_CLASS_UID not in CT_SOP_CLASSES  # the SCP ignores it: no processing loop
        assert gsps.Modality == "PR"
        assert gsps.StudyInstanceUID == lidc_headers[0].StudyInstanceUID
        assert gsps.SeriesInstanceUID != lidc_headers[0].SeriesInstanceUID

    def test_dciodvfy_reports_no_error(self, tmp_path, gsps):
        _dciodvfy(tmp_path, gsps)

    def test_research_use_is_stated(self, gsps):
        assert gsps.ContentLabel == CONTENT_LABEL
        assert RESEARCH_USE_NOTICE in gsps.ContentDescription
        assert len(gsps.ContentDescription) <= 64
        assert "research use" in gsps.SeriesDescription

    def test_references_every_slice_and_applies_the_lung_window(self, gsps, lidc_headers):
        (series,) = gsps.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == lidc_headers[0].SeriesInstanceUID
        assert {item.ReferencedSOPInstanceUID for item in series.ReferencedImageSequence} == {
            header.SOPInstanceUID for header in lidc_headers
        }
        (voi,) = gsps.SoftcopyVOILUTSequence
        assert (float(voi.WindowCenter), float(voi.WindowWidth)) == LUNG_WINDOW
        assert float(gsps.RescaleIntercept) == float(lidc_headers[0].RescaleIntercept)

    def test_each_nodule_outlined_on_its_centre_slice(self, gsps, lidc_headers, lidc_volume, findings):
        assert [layer.GraphicLayer for layer in gsps.GraphicLayerSequence] == [GRAPHIC_LAYER]
        annotations = gsps.GraphicAnnotationSequence
        assert len(annotations) == len(findings)
        for number, (annotation, finding) in enumerate(zip(annotations, findings, strict=True), start=1):
            (image,) = annotation.ReferencedImageSequence
            expected = lidc_volume.slices[round(finding.center_kji[0])]
            assert image.ReferencedSOPInstanceUID == expected.sop_instance_uid
            assert image.ReferencedSOPClassUID == expected.sop_class_uid
            (graphic,) = annotation.GraphicObjectSequence
            assert graphic.GraphicType == "POLYLINE"
            assert graphic.GraphicAnnotationUnits == "PIXEL"
            points = np.asarray(graphic.GraphicData, dtype=float).reshape(-1, 2)
            assert graphic.NumberOfGraphicPoints == len(points) >= 17
            np.testing.assert_array_equal(points[0], points[-1])  # closed
            (text,) = annotation.TextObjectSequence
            assert text.UnformattedTextValue == finding_label(
                number, finding.diameter_mm, finding.probability, finding.lung_rads
            )
            assert ":" not in text.UnformattedTextValue  # no "363698007: ..." code leak
            left, top = text.BoundingBoxTopLeftHandCorner
            right, bottom = text.BoundingBoxBottomRightHandCorner
            assert 0 <= left < right <= 512 and 0 <= top < bottom <= 512

    def test_by_default_a_lung_rads_2_finding_is_not_drawn(self, tmp_path, lidc_headers, lidc_volume, findings):
        """Default outline categories (3 and above): only the 4B nodule is drawn, still named
        "Nodule 1" as in the SR; the Lung-RADS 2 one ("Nodule 2") is listed in the SR only."""
        gsps = _roundtrip(build_gsps(lidc_headers, lidc_volume, nodule_report(findings), algorithm=algorithm()))
        _dciodvfy(tmp_path, gsps)
        (annotation,) = gsps.GraphicAnnotationSequence
        assert annotation.TextObjectSequence[0].UnformattedTextValue.startswith("Nodule 1 ")
        assert "4B" in annotation.TextObjectSequence[0].UnformattedTextValue

    def test_only_listed_findings_leave_no_graphics(self, lidc_headers, lidc_volume, findings):
        gsps = _roundtrip(
            build_gsps(lidc_headers, lidc_volume, nodule_report(findings), algorithm=algorithm(), outline_categories=())
        )
        assert "GraphicAnnotationSequence" not in gsps
        assert gsps.ContentDescription.startswith("AI: none outlined.")

    def test_luna16_outline_centred_on_the_nodule(self, gsps, lidc_headers):
        nearest = min(lidc_headers, key=lambda h: abs(float(h.ImagePositionPatient[2]) - LUNA16_NODULE_LPS[2]))
        origin_x, origin_y = (float(v) for v in nearest.ImagePositionPatient[:2])
        row_spacing, column_spacing = (float(v) for v in nearest.PixelSpacing)
        # PIXEL units: the centre of column c, row r is (c + 0.5, r + 0.5), PS3.3 C.10.5.1.2
        expected = np.array(
            [
                (LUNA16_NODULE_LPS[0] - origin_x) / column_spacing + 0.5,
                (LUNA16_NODULE_LPS[1] - origin_y) / row_spacing + 0.5,
            ]
        )
        annotation = gsps.GraphicAnnotationSequence[0]
        assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == nearest.SOPInstanceUID
        points = np.asarray(annotation.GraphicObjectSequence[0].GraphicData, dtype=float).reshape(-1, 2)
        centre = points[:-1].mean(axis=0)
        np.testing.assert_allclose(centre, expected, atol=1.0)
        radius_mm = np.hypot((points[:-1, 0] - centre[0]) * column_spacing, (points[:-1, 1] - centre[1]) * row_spacing)
        np.testing.assert_allclose(radius_mm, LUNA16_NODULE_DIAMETER / 2, rtol=1e-4)

    def test_label_below_the_outline_near_the_top_edge(self, gsps):
        annotation = gsps.GraphicAnnotationSequence[1]
        points = np.asarray(annotation.GraphicObjectSequence[0].GraphicData, dtype=float).reshape(-1, 2)
        assert annotation.TextObjectSequence[0].BoundingBoxTopLeftHandCorner[1] > points[:, 1].max()

    def test_no_finding_report_has_the_window_but_no_graphics(self, tmp_path, lidc_headers, lidc_volume):
        empty = _roundtrip(build_gsps(lidc_headers, lidc_volume, nodule_report(()), algorithm=algorithm()))
        _dciodvfy(tmp_path, empty)
        assert "GraphicAnnotationSequence" not in empty
        assert "no nodule" in empty.ContentDescription
        assert RESEARCH_USE_NOTICE in empty.ContentDescription
        assert len(empty.SoftcopyVOILUTSequence) == 1

    def test_series_is_stable_across_reruns(self, lidc_headers, lidc_volume, findings, gsps):
        again = build_gsps(lidc_headers, lidc_volume, nodule_report(findings), algorithm=algorithm())
        assert again.SeriesInstanceUID == gsps.SeriesInstanceUID
        assert again.SOPInstanceUID != gsps.SOPInstanceUID

    def test_explicit_uids_and_numbers(self, lidc_headers, lidc_volume):
        series_uid, sop_uid = generate_uid(), generate_uid()
        gsps = build_gsps(
            lidc_headers,
            lidc_volume,
            nodule_report(()),
            algorithm=algorithm(),
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            instance_number=2,
            series_number=77,
        )
        assert (gsps.SeriesInstanceUID, gsps.SOPInstanceUID, gsps.InstanceNumber, gsps.SeriesNumber) == (
            series_uid,
            sop_uid,
            2,
            77,
        )


class TestBuildGSPSRejects:
    def test_empty_evidence(self, lidc_volume, findings):
        with pytest.raises(ReportError, match="no evidence"):
            build_gsps([], lidc_volume, nodule_report(findings), algorithm=algorithm())

    def test_evidence_from_another_series(self, lidc_headers, lidc_volume, findings):
        stranger = copy.deepcopy(lidc_headers[3])
        stranger.SeriesInstanceUID = generate_uid()
        with pytest.raises(ReportError, match="belongs to series"):
            build_gsps([*lidc_headers[:3], stranger], lidc_volume, nodule_report(findings), algorithm=algorithm())

    def test_missing_centre_slice(self, lidc_headers, lidc_volume, findings):
        centre = lidc_volume.slices[round(findings[0].center_kji[0])].sop_instance_uid
        evidence = [h for h in lidc_headers if h.SOPInstanceUID != centre]
        with pytest.raises(ReportError, match="nodule 1.*not among the evidence"):
            build_gsps(evidence, lidc_volume, nodule_report(findings), algorithm=algorithm())

    def test_centre_slice_outside_the_volume(self, lidc_headers, lidc_volume, findings):
        outside = Finding(**(vars(findings[1]) | {"center_kji": (200.0, 300.0, 150.0)}))
        with pytest.raises(ReportError, match="nodule 1: centre slice"):
            build_gsps(lidc_headers, lidc_volume, nodule_report((outside,)), algorithm=algorithm())

    def test_report_of_another_model(self, lidc_headers, lidc_volume, findings):
        with pytest.raises(ReportError, match="algorithm identity"):
            build_gsps(lidc_headers, lidc_volume, nodule_report(findings, model_version="9"), algorithm=algorithm())

    @pytest.mark.parametrize(
        ("changes", "error", "match"),
        [
            ({"algorithm": "LungScreen"}, TypeError, "algorithm"),
            ({"sop_instance_uid": "1.2.abc"}, ValueError, "sop_instance_uid"),
            ({"series_instance_uid": "01.2"}, ValueError, "series_instance_uid"),
            ({"instance_number": 0}, ValueError, "instance_number"),
            ({"outline_categories": ["5"]}, ValueError, "outline_categories"),
            ({"series_number": "9002"}, ValueError, "series_number"),
        ],
    )
    def test_bad_arguments(self, lidc_headers, lidc_volume, changes, error, match):
        arguments = dict(algorithm=algorithm()) | changes
        with pytest.raises(error, match=match):
            build_gsps(lidc_headers, lidc_volume, nodule_report(()), **arguments)


class TestKeySlice:
    def test_centre_of_the_luna16_nodule(self, lidc_series_dir, lidc_headers):
        nearest = min(lidc_headers, key=lambda h: abs(float(h.ImagePositionPatient[2]) - LUNA16_NODULE_LPS[2]))
        found = key_slice(Path(nearest.filename), LUNA16_NODULE_LPS)
        assert found.hu.shape == (512, 512)
        assert found.distance_mm < 1.5

    def test_an_image_without_plane_geometry_is_refused_with_its_name(self, tmp_path, lidc_headers):
        # The error path once called the frame's label property as a method (a TypeError).
        dataset = pydicom.dcmread(lidc_headers[0].filename)
        del dataset.ImagePositionPatient
        path = tmp_path / "no-geometry.dcm"
        dataset.save_as(path, enforce_file_format=True)
        with pytest.raises(VolumeError, match="no plane geometry"):
            key_slice(path, LUNA16_NODULE_LPS)
