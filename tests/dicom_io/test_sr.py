"""Tests of dicom_io.sr: the TID 1500 report on the real LIDC-IDRI-0001 series (headers only)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, generate_uid

from lungscreen.errors import ReportError
from lungscreen.dicom_io.sr import (
    LOCAL_SCHEME,
    OHIF_FREEHAND_TRACKING,
    PROCEDURE_REPORTED,
    RESEARCH_USE_NOTICE,
    SERIES_DESCRIPTION,
    BillingCodes,
    build_sr,
    finding_label,
    main_exam_procedure,
)
from lungscreen.dicom_io.volume import Volume
from lidc_reports import (
    DEVICE_UID,
    LUNA16_NODULE_DIAMETER,
    LUNA16_NODULE_LPS,
    MODEL_NAME,
    MODEL_VERSION,
    algorithm,
    lidc_findings,
    nodule_report,
    validate_sr,
)
from lungscreen.findings import Finding, NoduleReport, NoduleType

AI_EXTENSION = ("AI-LUNG-EXT", "99LUNGSCREEN", "AI-assisted diagnosis extension item")
FALLBACK_PROCEDURE = ("CT-CHEST-LDCT", "99LUNGSCREEN", "Low-dose CT chest")
BILLING = BillingCodes(ai_extension_code=AI_EXTENSION, fallback_procedure_code=FALLBACK_PROCEDURE)


def _report(findings: tuple[Finding, ...], **changes) -> NoduleReport:
    return nodule_report(findings, **({"suppressed": {"calcified": 1, "min_diameter_mm": 4}} | changes))


@pytest.fixture(scope="module")
def findings(lidc_volume: Volume) -> tuple[Finding, Finding]:
    return lidc_findings(lidc_volume, small_kji=(40.0, 300.0, 150.0))


def _write(sr: Dataset) -> bytes:
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, sr, enforce_file_format=True)
    return buffer.getvalue()


def _read(data: bytes) -> hd.sr.ComprehensiveSR:
    return hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(BytesIO(data)))


@pytest.fixture(scope="module")
def sr_bytes(lidc_headers, lidc_volume, findings) -> bytes:
    return _write(
        build_sr(lidc_headers, lidc_volume, _report(findings), algorithm=algorithm(), billing=BILLING)
    )


@pytest.fixture(scope="module")
def empty_sr_bytes(lidc_headers, lidc_volume) -> bytes:
    return _write(build_sr(lidc_headers, lidc_volume, _report(()), algorithm=algorithm(), billing=BILLING))


@pytest.fixture(scope="module")
def sr(sr_bytes) -> hd.sr.ComprehensiveSR:
    return _read(sr_bytes)


def _items(item: Dataset):
    """Depth-first walk over a content tree."""
    for child in item.get("ContentSequence", []):
        yield child
        yield from _items(child)


def _text_values(sr: Dataset, name) -> list[str]:
    return [
        item.TextValue
        for item in _items(sr)
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == name.value
    ]


def _document_evaluations(sr: Dataset) -> Dataset:
    (container,) = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    ]
    return container


# The PixelMed warnings kept on purpose (see dicom_io/sr.py): its 20220618 template tables lack
# TID 1501 rows 11 and 12, where each nodule's qualitative evaluations and Comment are.
KEPT_WARNING = re.compile(
    r"^Warning: [0-9.]+: .*/CONTAINER \(125007,DCM,\"Measurement Group\"\)/"
    r"(CODE \((NODULE-TYPE|LUNG-RADS-2022|ACTIONABLE),99LUNGSCR,\"[^\"]+\"\)|TEXT \(121106,DCM,\"Comment\"\))"
    r": Content Item not in template$"
)


def _validate(tmp_path: Path, data: bytes) -> list[str]:
    """dciodvfy and PixelMed on ``data``: no error from either, no warning but the kept ones."""
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    warnings = validate_sr(path)
    assert [w for w in warnings if not KEPT_WARNING.match(w)] == [], warnings
    return warnings


def _dsrdump(tmp_path: Path, data: bytes) -> str:
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (dcmtk) is not installed")
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    # +Pl: long texts in full (the tracking identifiers and labels)
    result = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


class TestAlgorithmIdentity:
    def test_valid(self):
        assert algorithm().device_uid == DEVICE_UID
        assert algorithm(institution=None).institution is None

    @pytest.mark.parametrize(
        ("changes", "error", "match"),
        [
            ({"manufacturer": ""}, ValueError, "manufacturer"),
            ({"model_name": 42}, TypeError, "model_name"),
            ({"software_version": "x" * 65}, ValueError, "software_version"),
            ({"model_version": "1\\2"}, ValueError, "model_version"),
            ({"device_uid": "1.2.03"}, ValueError, "device_uid"),
            ({"device_uid": None}, TypeError, "device_uid"),
            ({"institution": " "}, ValueError, "institution"),
        ],
    )
    def test_rejects(self, changes, error, match):
        with pytest.raises(error, match=match):
            algorithm(**changes)


class TestBillingCodes:
    @pytest.mark.parametrize(
        ("changes", "error", "match"),
        [
            ({"ai_extension_code": ("AI-LUNG-EXT", "99LUNGSCREEN")}, TypeError, "ai_extension_code"),
            ({"ai_extension_code": ["AI", "99X", "AI"]}, TypeError, "ai_extension_code"),
            ({"fallback_procedure_code": ("CT", "", "CT chest")}, ValueError, "fallback_procedure_code"),
            (
                {"fallback_procedure_code": ("CT", "99" + "X" * 15, "CT chest")},
                ValueError,
                "fallback_procedure_code",
            ),
        ],
    )
    def test_rejects(self, changes, error, match):
        arguments = dict(ai_extension_code=AI_EXTENSION, fallback_procedure_code=FALLBACK_PROCEDURE)
        with pytest.raises(error, match=match):
            BillingCodes(**(arguments | changes))


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _ordered_ct_header(header: Dataset) -> Dataset:
    """``header`` with the order information a RIS-scheduled CT carries."""
    ordered = copy.deepcopy(header)
    request = Dataset()
    request.AccessionNumber = header.AccessionNumber
    request.RequestedProcedureID = "RP-77"
    request.StudyInstanceUID = header.StudyInstanceUID
    request.RequestedProcedureCodeSequence = [_code_item("CT-THX-REQ", "99HOSP", "CT thorax (requested)")]
    ordered.RequestAttributesSequence = [request]
    ordered.ProcedureCodeSequence = [_code_item("CT-THX", "99HOSP", "CT thorax")]
    return ordered


class TestMainExamProcedure:
    def test_fallback_without_codes(self, lidc_headers):
        assert main_exam_procedure(lidc_headers[0], BILLING) == FALLBACK_PROCEDURE

    def test_the_ordered_procedure_first(self, lidc_headers):
        header = _ordered_ct_header(lidc_headers[0])
        assert main_exam_procedure(header, BILLING) == ("CT-THX-REQ", "99HOSP", "CT thorax (requested)")

    def test_procedure_code_sequence_without_an_ordered_code(self, lidc_headers):
        header = _ordered_ct_header(lidc_headers[0])
        del header.RequestAttributesSequence[0].RequestedProcedureCodeSequence
        assert main_exam_procedure(header, BILLING) == ("CT-THX", "99HOSP", "CT thorax")

    def test_unreadable_code(self, lidc_headers):
        header = copy.deepcopy(lidc_headers[0])
        header.ProcedureCodeSequence = [Dataset()]
        with pytest.raises(ReportError, match="procedure code"):
            main_exam_procedure(header, BILLING)


class TestBuildSR:
    def test_is_comprehensive_sr_of_the_ct_study(self, sr, lidc_headers):
        ct = lidc_headers[0]
        assert sr.SOPClassUID == ComprehensiveSRStorage
        assert sr.Modality == "SR"
        assert sr.StudyInstanceUID == ct.StudyInstanceUID
        assert sr.AccessionNumber == ct.AccessionNumber
        assert sr.PatientID == ct.PatientID
        assert sr.SeriesDescription == SERIES_DESCRIPTION
        assert sr.Manufacturer == "LungScreen project"
        assert sr.InstitutionName == "Test Hospital"
        assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        assert (
            len(
                sr.CurrentRequestedProcedureEvidenceSequence[0]
                .ReferencedSeriesSequence[0]
                .ReferencedSOPSequence
            )
            == 133
        )

    def test_validators_report_no_error(self, tmp_path, sr_bytes):
        warnings = _validate(tmp_path, sr_bytes)
        # three qualitative evaluations and a Comment in the outlined nodule's group
        assert len(warnings) == 4

    def test_dsrdump_shows_title_and_nodules(self, tmp_path, sr_bytes):
        output = _dsrdump(tmp_path, sr_bytes)
        assert "Imaging Measurement Report" in output
        assert f'"{OHIF_FREEHAND_TRACKING}:Nodule 1"' in output
        assert '"Nodule 1 · 23.4 mm · p 0.93 · Lung-RADS 4B"' in output
        assert '="Nodule 2 · 5.0 mm · p 0.41 · Lung-RADS 2 · ' in output

    def test_one_group_per_outlined_nodule_with_its_own_tracking_uid(self, sr):
        # the outlined one is named for OHIF's freehand tool, so that OHIF loads it as a measurement
        (group,) = sr.content.get_image_measurement_groups()
        assert group.tracking_identifier == f"{OHIF_FREEHAND_TRACKING}:Nodule 1"
        assert group.finding_type == codes.SCT.Nodule
        # Finding Category is not written (optional; PixelMed's templates do not know it)
        assert group.finding_category is None
        assert sr.content.get_planar_roi_measurement_groups() == []  # no TID 1410

    def test_tracking_uids_are_distinct_per_outlined_nodule(self, lidc_headers, lidc_volume, findings):
        sr = _read(_write(build_sr(
            lidc_headers, lidc_volume, _report(findings), algorithm=algorithm(), billing=BILLING,
            outline_categories=["2", "4B"],
        )))
        groups = sr.content.get_image_measurement_groups()
        assert len({group.tracking_uid for group in groups}) == len(groups) == 2

    def test_each_group_is_labelled_for_the_reader(self, sr, findings):
        """A Comment (TID 1501 row 12) with the label the GSPS and review page show: OHIF titles
        its measurement panel row with it. UTF-8 for the middle dot."""
        assert sr.SpecificCharacterSet == "ISO_IR 192"
        (group,) = sr.content.get_image_measurement_groups()
        (comment,) = [
            item for item in group[0].ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"
        ]
        finding = findings[0]
        assert comment.TextValue == finding_label(1, finding.diameter_mm, finding.probability, finding.lung_rads)

    def test_lung_rads_2_finding_is_listed_without_an_outline(self, sr, lidc_volume, findings):
        """Default outline categories: the 5 mm Lung-RADS 2 nodule is no measurement group (no
        SCOORD a viewer would draw) but a line of the document's Qualitative Evaluations."""
        assert not [
            item for item in _items(sr) if item.ValueType == "TEXT" and item.TextValue.endswith("Nodule 2")
        ]
        (listed,) = _text_values(_document_evaluations(sr), hd.sr.CodedConcept("LISTED", LOCAL_SCHEME, "x"))
        centre = lidc_volume.slices[round(findings[1].center_kji[0])]
        assert listed.startswith("Nodule 2 · 5.0 mm · p 0.41 · Lung-RADS 2 · ground-glass · volume 65 mm3 · not actionable")
        assert listed.endswith(f"mm LPS on image {centre.sop_instance_uid}")

    def test_outline_categories_decide_which_findings_get_a_group(self, lidc_headers, lidc_volume, findings):
        def outlined(categories):
            sr = _read(_write(build_sr(
                lidc_headers, lidc_volume, _report(findings), algorithm=algorithm(), billing=BILLING,
                outline_categories=categories,
            )))
            return [
                group.tracking_identifier.removeprefix(f"{OHIF_FREEHAND_TRACKING}:")
                for group in sr.content.get_image_measurement_groups()
            ]

        assert outlined(["2", "4B"]) == ["Nodule 1", "Nodule 2"]
        assert outlined(["2"]) == ["Nodule 2"]
        assert outlined([]) == []

    @pytest.mark.parametrize(("categories", "error"), [(["5"], ValueError), ("4B", TypeError)])
    def test_rejects_unknown_outline_categories(self, lidc_headers, lidc_volume, findings, categories, error):
        with pytest.raises(error, match="outline_categories"):
            build_sr(
                lidc_headers, lidc_volume, _report(findings), algorithm=algorithm(), billing=BILLING,
                outline_categories=categories,
            )

    def test_luna16_nodule_is_a_closed_circle_on_its_slice(self, sr, lidc_headers):
        nearest = min(
            lidc_headers, key=lambda h: abs(float(h.ImagePositionPatient[2]) - LUNA16_NODULE_LPS[2])
        )
        origin_x, origin_y = (float(v) for v in nearest.ImagePositionPatient[:2])
        row_spacing, column_spacing = (float(v) for v in nearest.PixelSpacing)
        # SCOORD pixel coordinates: the centre of column c, row r is (c + 0.5, r + 0.5), PS3.3 C.18.6.1.1
        expected_x = (LUNA16_NODULE_LPS[0] - origin_x) / column_spacing + 0.5
        expected_y = (LUNA16_NODULE_LPS[1] - origin_y) / row_spacing + 0.5

        group = sr.content.get_image_measurement_groups()[0]
        # the first measurement is the area, inferred from the outline (TID 1501 rows 10, 10c)
        area = next(item for item in group[0].ContentSequence if item.ValueType == "NUM")
        assert area.ConceptNameCodeSequence[0].CodeValue == codes.SCT.Area.value
        (region,) = [item for item in area.ContentSequence if item.ValueType == "SCOORD"]
        assert region.RelationshipType == "INFERRED FROM"
        assert region.GraphicType == "POLYLINE"
        points = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)
        assert 17 <= len(points) <= 33
        np.testing.assert_array_equal(points[0], points[-1])
        centroid = points[:-1].mean(axis=0)
        assert abs(centroid[0] - expected_x) < 1.0
        assert abs(centroid[1] - expected_y) < 1.0
        radius_mm = np.hypot(
            (points[:-1, 0] - centroid[0]) * column_spacing, (points[:-1, 1] - centroid[1]) * row_spacing
        )
        np.testing.assert_allclose(radius_mm, LUNA16_NODULE_DIAMETER / 2, rtol=1e-5)
        # the inscribed 32-gon of the circle (the polyline drawn), not the circle
        polygon = 0.5 * 32 * (LUNA16_NODULE_DIAMETER / 2) ** 2 * np.sin(2 * np.pi / 32)
        assert float(area.MeasuredValueSequence[0].NumericValue) == pytest.approx(polygon, rel=1e-4)

        (source,) = [item for item in region.ContentSequence if item.RelationshipType == "SELECTED FROM"]
        assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == nearest.SOPInstanceUID
        assert source.ReferencedSOPSequence[0].ReferencedSOPClassUID == nearest.SOPClassUID

    def test_measurements(self, lidc_headers, lidc_volume, findings):
        sr = _read(_write(build_sr(
            lidc_headers, lidc_volume, _report(findings), algorithm=algorithm(), billing=BILLING,
            outline_categories=["2", "4B"],
        )))
        for group, finding in zip(sr.content.get_image_measurement_groups(), findings, strict=True):
            (diameter,) = group.get_measurements(name=codes.SCT.Diameter)
            assert diameter.value == pytest.approx(finding.diameter_mm)
            assert diameter.unit == codes.UCUM.Millimeter
            (volume,) = group.get_measurements(name=codes.SCT.Volume)
            assert volume.value == pytest.approx(finding.volume_mm3)
            assert volume.unit == codes.UCUM.CubicMillimeter
            (certainty,) = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
            assert certainty.value == pytest.approx(100 * finding.probability)
            assert certainty.unit == codes.UCUM.Percent

    def test_no_finding_site(self, sr):
        # No lobe is known: a bare "Lung" says nothing about a lung nodule and OHIF would label
        # it "363698007: Lung".
        (group,) = sr.content.get_image_measurement_groups()
        assert group.finding_sites == []

    def test_qualitative_evaluations_use_the_declared_local_scheme(self, sr):
        group = sr.content.get_image_measurement_groups()[0]
        values = {
            evaluation.name.meaning: evaluation.value for evaluation in group.get_qualitative_evaluations()
        }
        assert values["Nodule type"].value == "SOLID"
        assert values["Suggested Lung-RADS v2022 category"].value == "LR-4B"
        assert values["Suggested Lung-RADS v2022 category"].scheme_designator == LOCAL_SCHEME
        assert values["Actionable per clinical rules"] == codes.SCT.Yes
        declared = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
        assert {LOCAL_SCHEME, AI_EXTENSION[1]} <= declared

    def test_algorithm_identification(self, sr):
        assert _text_values(sr, codes.DCM.AlgorithmName) == [MODEL_NAME]  # the one outlined nodule's group
        assert "operating point: screening" in _text_values(sr, codes.DCM.AlgorithmParameters)
        (equipment,) = [item for item in sr.ContributingEquipmentSequence if "DeviceUID" in item]
        assert equipment.DeviceUID == DEVICE_UID
        assert equipment.ManufacturerModelName == MODEL_NAME
        assert list(equipment.SoftwareVersions) == ["0.1.0", MODEL_VERSION]
        (observer,) = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
        assert observer.observer_identifying_attributes.uid == DEVICE_UID

    def test_image_library_lists_the_centre_slices(self, sr, lidc_volume, findings):
        (library,) = [
            item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"
        ]
        listed = [
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in _items(library)
            if item.ValueType == "IMAGE"
        ]
        expected = [lidc_volume.slices[round(finding.center_kji[0])].sop_instance_uid for finding in findings]
        assert listed == expected

    def test_procedure_reported_is_from_cid_100(self, sr):
        (procedure,) = [
            item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"
        ]
        reported = hd.sr.CodedConcept.from_dataset(procedure.ConceptCodeSequence[0])
        assert reported == PROCEDURE_REPORTED
        assert reported in [getattr(codes.cid100, name) for name in dir(codes.cid100)]

    def test_billing_links_to_the_main_exam(self, sr, lidc_headers):
        """The AI extension item is the performed procedure; the main exam item (the ledger's
        main item, :func:`main_exam_procedure`) is the requested procedure of the order."""
        (performed,) = sr.PerformedProcedureCodeSequence
        assert (performed.CodeValue, performed.CodingSchemeDesignator, performed.CodeMeaning) == AI_EXTENSION
        (request,) = sr.ReferencedRequestSequence
        assert request.AccessionNumber == lidc_headers[0].AccessionNumber
        assert request.StudyInstanceUID == lidc_headers[0].StudyInstanceUID
        assert "ReferencedStudySequence" in request
        (code,) = request.RequestedProcedureCodeSequence
        main_item = (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning)
        assert main_item == main_exam_procedure(lidc_headers[0], BILLING) == FALLBACK_PROCEDURE
        assert FALLBACK_PROCEDURE[1] in {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}

    def test_order_information_of_the_ct(self, tmp_path, lidc_headers, lidc_volume, findings):
        ordered = _ordered_ct_header(lidc_headers[0])
        evidence = [ordered, *lidc_headers[1:]]
        data = _write(
            build_sr(evidence, lidc_volume, _report(findings), algorithm=algorithm(), billing=BILLING)
        )
        _validate(tmp_path, data)
        sr = _read(data)
        (request,) = sr.ReferencedRequestSequence
        assert request.RequestedProcedureID == "RP-77"
        (code,) = request.RequestedProcedureCodeSequence
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == main_exam_procedure(ordered, BILLING)
        assert code.CodeValue == "CT-THX-REQ"
        assert "99HOSP" in {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}

    def test_document_level_statements(self, sr):
        container = _document_evaluations(sr)
        assert _text_values(container, codes.DCM.Comment) == [RESEARCH_USE_NOTICE]
        texts = {
            item.ConceptNameCodeSequence[0].CodeMeaning: item.get("TextValue")
            for item in container.ContentSequence
        }
        assert texts["Operating point"] == "screening"
        assert texts["Detector score threshold"] == "0.35"
        assert _text_values(container, hd.sr.CodedConcept("SUPPRESSED", LOCAL_SCHEME, "x")) == [
            "calcified: 1",
            "min_diameter_mm: 4",
        ]
        summary, exam_category = [item for item in container.ContentSequence if item.ValueType == "CODE"]
        assert summary.ConceptCodeSequence[0].CodeValue == codes.DCM.AllAlgorithmsSucceededWithFindings.value
        # the 23.4 mm solid nodule (4B) outranks the small one (2)
        assert exam_category.ConceptNameCodeSequence[0].CodeMeaning == "Suggested Lung-RADS v2022 category"
        assert exam_category.ConceptCodeSequence[0].CodeValue == "LR-4B"
        assert _text_values(container, codes.DCM.Finding) == [
            "2 nodules reported (1 outlined) at operating point screening; suggested exam category Lung-RADS 4B"
            " (score threshold 0.35)."
        ]

    def test_calcified_nodule_is_benign_lung_rads_1(self, tmp_path, lidc_headers, lidc_volume, findings):
        calcified = replace(findings[0], nodule_type=NoduleType.CALCIFIED, lung_rads="1", actionable=False)
        data = _write(
            build_sr(
                lidc_headers, lidc_volume, _report((calcified,)), algorithm=algorithm(), billing=BILLING,
                outline_categories=["1"],  # a site that outlines benign findings too
            )
        )
        _validate(tmp_path, data)
        group = _read(data).content.get_image_measurement_groups()[0]
        values = {evaluation.name.meaning: evaluation.value for evaluation in group.get_qualitative_evaluations()}
        assert values["Nodule type"].value == "CALCIFIED"
        assert values["Suggested Lung-RADS v2022 category"].value == "LR-1"
        assert values["Actionable per clinical rules"] == codes.SCT.No

    def test_no_finding_report(self, tmp_path, empty_sr_bytes, lidc_volume):
        _validate(tmp_path, empty_sr_bytes)
        assert "Imaging Measurement Report" in _dsrdump(tmp_path, empty_sr_bytes)
        sr = _read(empty_sr_bytes)
        assert sr.content.get_planar_roi_measurement_groups() == []
        assert sr.content.get_image_measurement_groups() == []
        assert not [item for item in _items(sr) if item.ConceptNameCodeSequence[0].CodeValue == "125007"]
        container = _document_evaluations(sr)
        assert _text_values(container, codes.DCM.Finding) == [
            "No nodule detected at operating point screening (score threshold 0.35)."
        ]
        (summary,) = [item for item in container.ContentSequence if item.ValueType == "CODE"]
        assert (
            summary.ConceptCodeSequence[0].CodeValue == codes.DCM.AllAlgorithmsSucceededWithoutFindings.value
        )
        assert RESEARCH_USE_NOTICE in _text_values(container, codes.DCM.Comment)
        middle = lidc_volume.slices[len(lidc_volume.slices) // 2].sop_instance_uid
        assert [
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in _items(sr)
            if item.ValueType == "IMAGE"
        ] == [middle]

    def test_rerun_supersedes_its_predecessor_in_the_same_series(
        self, tmp_path, lidc_headers, lidc_volume, findings, sr
    ):
        rerun = build_sr(
            lidc_headers,
            lidc_volume,
            _report(findings),
            algorithm=algorithm(),
            billing=BILLING,
            predecessor=sr,
        )
        assert rerun.SeriesInstanceUID == sr.SeriesInstanceUID
        assert rerun.SOPInstanceUID != sr.SOPInstanceUID
        data = _write(rerun)
        _validate(tmp_path, data)
        reread = _read(data)
        (study,) = reread.PredecessorDocumentsSequence
        reference = study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == sr.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == ComprehensiveSRStorage

    def test_ct_without_type2_study_attributes(self, tmp_path, lidc_headers, lidc_volume, findings):
        sparse = copy.deepcopy(lidc_headers[0])
        for keyword in ("PatientBirthDate", "StudyID", "StudyTime", "ReferringPhysicianName"):
            delattr(sparse, keyword)
        evidence = [sparse, *lidc_headers[1:]]
        data = _write(
            build_sr(evidence, lidc_volume, _report(findings), algorithm=algorithm(), billing=BILLING)
        )
        _validate(tmp_path, data)
        sr = _read(data)
        assert sr.StudyID == "" and sr.PatientBirthDate == ""
        assert "StudyID" not in sparse

    def test_explicit_uids_and_numbers(self, lidc_headers, lidc_volume):
        series_uid, sop_uid = generate_uid(), generate_uid()
        sr = build_sr(
            lidc_headers,
            lidc_volume,
            _report(()),
            algorithm=algorithm(),
            billing=BILLING,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            instance_number=3,
            series_number=42,
        )
        assert (sr.SeriesInstanceUID, sr.SOPInstanceUID, sr.InstanceNumber, sr.SeriesNumber) == (
            series_uid,
            sop_uid,
            3,
            42,
        )


class TestBuildSRRejects:
    def test_empty_evidence(self, lidc_volume, findings):
        with pytest.raises(ReportError, match="no evidence"):
            build_sr([], lidc_volume, _report(findings), algorithm=algorithm(), billing=BILLING)

    @pytest.mark.parametrize(
        ("keyword", "match"),
        [("StudyInstanceUID", "belongs to study"), ("SeriesInstanceUID", "belongs to series")],
    )
    def test_evidence_from_another_study_or_series(self, lidc_headers, lidc_volume, findings, keyword, match):
        stranger = copy.deepcopy(lidc_headers[5])
        setattr(stranger, keyword, generate_uid())
        evidence = [*lidc_headers[:5], stranger, *lidc_headers[6:]]
        with pytest.raises(ReportError, match=match):
            build_sr(evidence, lidc_volume, _report(findings), algorithm=algorithm(), billing=BILLING)

    def test_evidence_without_the_centre_slice(self, lidc_headers, lidc_volume, findings):
        centre = lidc_volume.slices[round(findings[0].center_kji[0])].sop_instance_uid
        evidence = [header for header in lidc_headers if header.SOPInstanceUID != centre]
        with pytest.raises(ReportError, match="nodule 1.*not among the evidence"):
            build_sr(evidence, lidc_volume, _report(findings), algorithm=algorithm(), billing=BILLING)

    @pytest.mark.parametrize("k", [-0.6, 132.6, 500.0])
    def test_centre_slice_outside_the_volume(self, lidc_headers, lidc_volume, findings, k):
        outside = Finding(**(vars(findings[1]) | {"center_kji": (k, 300.0, 150.0)}))
        with pytest.raises(ReportError, match="nodule 2: centre slice"):
            build_sr(
                lidc_headers,
                lidc_volume,
                _report((findings[0], outside)),
                algorithm=algorithm(),
                billing=BILLING,
            )

    def test_centre_outside_the_image(self, lidc_headers, lidc_volume, findings):
        outside = Finding(**(vars(findings[1]) | {"center_kji": (40.0, 300.0, 512.0)}))
        with pytest.raises(ReportError, match="outside the image"):
            build_sr(lidc_headers, lidc_volume, _report((outside,)), algorithm=algorithm(), billing=BILLING)

    @pytest.mark.parametrize(
        ("changes", "match"),
        [
            ({"lung_rads": "5"}, "Lung-RADS"),
            ({"probability": 1.5}, "probability"),
        ],
    )
    def test_unencodable_finding(self, lidc_headers, lidc_volume, findings, changes, match):
        finding = Finding(**(vars(findings[0]) | changes))
        with pytest.raises(ReportError, match=match):
            build_sr(lidc_headers, lidc_volume, _report((finding,)), algorithm=algorithm(), billing=BILLING)

    def test_report_of_another_model(self, lidc_headers, lidc_volume, findings):
        with pytest.raises(ReportError, match="algorithm identity"):
            build_sr(
                lidc_headers,
                lidc_volume,
                _report(findings, model_version="9.9"),
                algorithm=algorithm(),
                billing=BILLING,
            )

    def test_predecessor_from_another_study(self, lidc_headers, lidc_volume, findings, sr):
        foreign = copy.deepcopy(sr)
        foreign.StudyInstanceUID = generate_uid()
        with pytest.raises(ReportError, match="predecessor"):
            build_sr(
                lidc_headers,
                lidc_volume,
                _report(findings),
                algorithm=algorithm(),
                billing=BILLING,
                predecessor=foreign,
            )

    @pytest.mark.parametrize(
        ("changes", "error", "match"),
        [
            ({"algorithm": "LungScreen"}, TypeError, "algorithm"),
            ({"billing": AI_EXTENSION}, TypeError, "billing"),
            ({"sop_instance_uid": "1.2.abc"}, ValueError, "sop_instance_uid"),
            ({"series_instance_uid": "01.2"}, ValueError, "series_instance_uid"),
            ({"instance_number": 0}, ValueError, "instance_number"),
            ({"series_number": "9001"}, ValueError, "series_number"),
        ],
    )
    def test_bad_arguments(self, lidc_headers, lidc_volume, changes, error, match):
        arguments = dict(algorithm=algorithm(), billing=BILLING) | changes
        with pytest.raises(error, match=match):
            build_sr(lidc_headers, lidc_volume, _report(()), **arguments)


def test_prior_evidence_is_refused_unless_the_report_was_compared_with_that_study(lidc_headers, lidc_volume, findings):
    from lungscreen.findings import Comparison, ComparisonStatus

    prior_header = copy.deepcopy(lidc_headers[0])
    prior_header.StudyInstanceUID, prior_header.SeriesInstanceUID, prior_header.SOPInstanceUID = "2.25.7", "2.25.8", "2.25.9"
    baseline = _report(findings)
    with pytest.raises(ReportError, match="not compared with a prior"):
        build_sr(lidc_headers, lidc_volume, baseline, algorithm=algorithm(), billing=BILLING, prior_evidence=[prior_header])
    other = replace(baseline, comparison=Comparison(ComparisonStatus.COMPARED, prior_study_uid="2.25.1", prior_study_date="20241211"))
    with pytest.raises(ReportError, match="not the prior compared with"):
        build_sr(lidc_headers, lidc_volume, other, algorithm=algorithm(), billing=BILLING, prior_evidence=[prior_header])


def test_prior_nodules_resolved_still_seen_and_not_scanned_are_valid_text_lines(lidc_headers, lidc_volume, findings, tmp_path):
    from lungscreen.findings import Comparison, ComparisonStatus, PriorNodule, StillSeen

    def prior(number, diameter):
        return PriorNodule((0.0, 0.0, 0.0), diameter, 100.0, NoduleType.SOLID, "3", f"2.25.{number}", f"Nodule {number}")

    comparison = Comparison(
        ComparisonStatus.COMPARED, prior_study_uid="2.25.1", prior_study_date="20241211", interval_days=400,
        resolved=(prior(3, 5.0),), still_seen=(StillSeen(prior(4, 6.5), 5.9), StillSeen(prior(5, 7.0), None)),
        not_scanned=(prior(6, 8.0),),
    )
    data = _write(build_sr(lidc_headers, lidc_volume, _report(findings, comparison=comparison), algorithm=algorithm(),
                           billing=BILLING))
    _validate(tmp_path, data)
    texts = [str(e.value) for e in pydicom.dcmread(BytesIO(data)).iterall() if e.keyword == "TextValue"]
    assert "Nodule 3 (tracking UID 2.25.3), 5.0 mm on the prior study, not seen now" in texts
    assert ("Nodule 4 (tracking UID 2.25.4), 6.5 mm on the prior study, still seen (5.9 mm) but not reported now: "
            "below the operating point or the reporting rules") in texts
    assert ("Nodule 5 (tracking UID 2.25.5), 7.0 mm on the prior study, still seen (joined to dense tissue, not measured) "
            "but not reported now: below the operating point or the reporting rules") in texts
    assert "Nodule 6 (tracking UID 2.25.6), 8.0 mm on the prior study, outside the range this study covers" in texts
