"""The model card: the contract between a detector (an ``.onnx`` file) and the server.

A card is JSON validated against ``models/schema/model_card.schema.json``. It declares how
to preprocess (orientation, spacing, intensity window), how to run the network (patch size,
overlap), how to decode its outputs into nodule candidates, how raw scores map to
calibrated probabilities, and the named operating points chosen on validation data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from lungscreen.errors import ModelError

SCHEMA_PATH = Path(__file__).with_name("schema") / "model_card.schema.json"
# The fixed-weight test model (models/blob_filter.py): deterministic, finds planted spheres.
BLOB_FILTER_CARD = Path(__file__).with_name("blob-filter") / "model_card.json"
# The detector trained by training/ (see training/README.md and the card's metrics).
DEFAULT_MODEL_CARD = Path(__file__).with_name("nodulenet") / "model_card.json"


@dataclass(frozen=True)
class OperatingPoint:
    name: str
    threshold: float  # on the calibrated probability
    description: str


@dataclass(frozen=True)
class ModelCard:
    path: Path  # the card file; the ONNX file is resolved relative to it
    raw: dict[str, Any]

    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def version(self) -> str:
        return self.raw["version"]

    @property
    def onnx_path(self) -> Path:
        return (self.path.parent / self.raw["onnx_file"]).resolve()

    @property
    def intended_use(self) -> str:
        return self.raw["intended_use"]

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.raw["preprocessing"]

    @property
    def inference(self) -> dict[str, Any]:
        return self.raw["inference"]

    @property
    def decoding(self) -> dict[str, Any]:
        return self.raw["decoding"]

    @property
    def calibration(self) -> dict[str, Any]:
        return self.raw["calibration"]

    @property
    def preferred_kernel(self) -> str | None:
        """``"soft"`` or ``"sharp"``: the reconstruction kernel family the detector was trained
        on, which the series selection prefers; ``None`` without a preference."""
        return self.raw.get("preferred_kernel")

    @property
    def default_operating_point(self) -> str:
        return self.raw["default_operating_point"]

    def operating_point(self, name: str | None = None) -> OperatingPoint:
        name = name or self.default_operating_point
        points = self.raw["operating_points"]
        if name not in points:
            raise ModelError(f"model card has no operating point {name!r}; it has {sorted(points)}")
        point = points[name]
        return OperatingPoint(name=name, threshold=float(point["threshold"]), description=point.get("description", ""))


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate_card(raw: dict[str, Any]) -> None:
    """Raise :class:`ModelError` naming the offending field when ``raw`` breaks the schema."""
    try:
        jsonschema.validate(raw, _schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ModelError(f"invalid model card at {where}: {exc.message}") from None
    if raw["default_operating_point"] not in raw["operating_points"]:
        raise ModelError(f"default_operating_point {raw['default_operating_point']!r} is not among operating_points")


def load_card(path: Path | str) -> ModelCard:
    """Load and validate a model card; ``path`` may be the card or a folder holding ``model_card.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / "model_card.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read model card {path}: {exc}") from None
    validate_card(raw)
    card = ModelCard(path=path.resolve(), raw=raw)
    if not card.onnx_path.is_file():
        raise ModelError(f"model card {path} names {raw['onnx_file']!r}, which does not exist")
    return card
