"""What the report tests (SR, GSPS) share: LIDC-IDRI-0001's LUNA16 nodule as a finding, a
small second finding, the algorithm identity, the report around them, and the validators:
dciodvfy (the IOD) and PixelMed's DicomSRValidator (the SR templates)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lungscreen.dicom_io.sr import AlgorithmIdentity
from lungscreen.dicom_io.volume import Volume
from lungscreen.findings import Finding, NoduleReport, NoduleType

# LUNA16 annotations.csv, series 1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192
LUNA16_NODULE_LPS = (56.21, 86.34, -115.87)
LUNA16_NODULE_DIAMETER = 23.35

MODEL_NAME = "lung_nodule_ct_detection"
MODEL_VERSION = "0.6.8"
DEVICE_UID = "1.2.826.0.1.3680043.8.498.4242"


def algorithm(**changes) -> AlgorithmIdentity:
    arguments = dict(
        manufacturer="LungScreen project",
        model_name=MODEL_NAME,
        software_version="0.1.0",
        model_version=MODEL_VERSION,
        device_uid=DEVICE_UID,
        institution="Test Hospital",
    )
    return AlgorithmIdentity(**(arguments | changes))


def nodule_report(findings: tuple[Finding, ...], **changes) -> NoduleReport:
    arguments = dict(
        findings=tuple(findings),
        operating_point="screening",
        score_threshold=0.35,
        model_name=MODEL_NAME,
        model_version=MODEL_VERSION,
    )
    return NoduleReport(**(arguments | changes))


def lidc_findings(volume: Volume, small_kji: tuple[float, float, float]) -> tuple[Finding, Finding]:
    """The LUNA16 nodule (solid, 4B, actionable) and a 5 mm ground-glass one centred at ``small_kji``."""
    luna = Finding(
        center_kji=tuple(float(v) for v in volume.lps_to_index(LUNA16_NODULE_LPS)),
        center_lps_mm=LUNA16_NODULE_LPS,
        diameter_mm=LUNA16_NODULE_DIAMETER,
        volume_mm3=6666.0,
        probability=0.93,
        nodule_type=NoduleType.SOLID,
        lung_rads="4B",
        actionable=True,
    )
    small = Finding(
        center_kji=small_kji,
        center_lps_mm=tuple(float(v) for v in volume.index_to_lps(small_kji)),
        diameter_mm=5.0,
        volume_mm3=65.4,
        probability=0.41,
        nodule_type=NoduleType.GROUND_GLASS,
        lung_rads="2",
        actionable=False,
    )
    return luna, small


PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")  # Debian libpixelmed-java
PIXELMED_SR_VALIDATOR = [
    "java",
    # PixelMed's stylesheets exceed the JDK's default XPath limits (shared/notes/dicom-facts.md).
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
    # Start-up dominates a run: the quick JIT tier and the serial collector start it sooner.
    "-XX:TieredStopAtLevel=1",
    "-XX:+UseSerialGC",
    "-cp",
    str(PIXELMED_JAR),
    "com.pixelmed.validate.DicomSRValidator",
]


def pixelmed_sr(path: Path) -> list[str]:
    """PixelMed DicomSRValidator's warnings for the SR at ``path``; fails the test on any
    ``Error:`` line or when the TID 1500 root template was not validated. One JVM per call
    (several seconds): validate few files."""
    if shutil.which("java") is None or not PIXELMED_JAR.is_file():
        pytest.skip("PixelMed (libpixelmed-java) or a Java runtime is not installed")
    result = subprocess.run([*PIXELMED_SR_VALIDATOR, str(path)], capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert "Found Root Template TID_1500" in output and "Root Template Validation Complete" in output, output
    assert not [line for line in output.splitlines() if line.startswith("Error")], output
    return [line for line in output.splitlines() if line.startswith("Warning")]


def validate_sr(path: Path) -> list[str]:
    """Both validators on the SR at ``path`` (no error from either); PixelMed's warnings."""
    dciodvfy(path)
    return pixelmed_sr(path)


def dciodvfy(path: Path) -> str:
    """dciodvfy's output for the file at ``path``; fails the test on any line starting with Error."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert not [line for line in output.splitlines() if line.startswith("Error")], output
    return output
