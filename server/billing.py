"""The billing ledger: AI-assisted diagnosis as an extension of the main exam item.

China's NHSA radiology pricing guideline (放射检查类医疗服务价格项目立项指南) places
"AI-assisted diagnosis" (人工智能辅助诊断) as an extension item under the main radiology
exam item: same price level, never charged separately or twice. So the ledger holds
exactly one row per (accession number, main exam item), linked to that item and carrying
no amount of its own; re-processing a study never adds a second row. The RIS reads the
ledger (``lungscreen billing export``) and posts charges against the accession.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass

from lungscreen.server.db import Database

CHARGE_RULE = "extension of the main exam item: no separate or additional charge"
COLUMNS = (
    "accession_number", "main_item_code", "main_item_scheme", "main_item_meaning", "extension_item_code",
    "extension_item_scheme", "extension_item_meaning", "study_uid", "report_sop_uid", "created_at",
)


@dataclass(frozen=True)
class ExtensionEntry:
    accession_number: str
    main_item: tuple[str, str, str]  # (code value, coding scheme, meaning) of the main exam
    extension_item: tuple[str, str, str]  # the AI-assisted diagnosis extension item
    study_uid: str
    report_sop_uid: str

    def __post_init__(self) -> None:
        if not self.accession_number:
            raise ValueError("a billing entry needs the main exam's accession number")
        if not all(self.main_item) or not all(self.extension_item):
            raise ValueError("main and extension items need code, scheme and meaning")


class BillingLedger:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, entry: ExtensionEntry) -> bool:
        """Add the entry unless (accession, main item) is already billed; True if added."""
        with self.db.transaction() as c:
            return bool(
                c.execute(
                    """INSERT OR IGNORE INTO billing (accession_number, main_item_code, main_item_scheme,
                       main_item_meaning, extension_item_code, extension_item_scheme, extension_item_meaning,
                       study_uid, report_sop_uid, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (entry.accession_number, *entry.main_item, *entry.extension_item, entry.study_uid,
                     entry.report_sop_uid, time.time()),
                ).rowcount
            )

    def rows(self) -> list[dict]:
        rows = self.db.query(f"SELECT {', '.join(COLUMNS)} FROM billing ORDER BY id")
        return [{**dict(r), "charge": CHARGE_RULE} for r in rows]

    def export(self, fmt: str) -> str:
        """The ledger as ``csv`` or ``json`` text for the RIS."""
        rows = self.rows()
        if fmt == "json":
            return json.dumps(rows, indent=2) + "\n"
        if fmt != "csv":
            raise ValueError(f"unknown export format {fmt!r} (csv or json)")
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[*COLUMNS, "charge"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
