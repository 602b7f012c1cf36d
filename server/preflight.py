"""Start-up checks of what the settings name: rules, the model, destinations, TLS files, the
data folder. They run before the server accepts an association (and in ``lungscreen config
check``), so a bad configuration stops the start with one message naming the setting, instead
of failing every study in the analysis worker later.

:class:`~server.config.Settings` has already checked each value's type and range; these
checks need the files and libraries the values point to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, is_dataclass
from typing import Any

from lungscreen.dicom_io.select import SelectionRules
from lungscreen.dicom_io.send import Destination
from lungscreen.errors import ModelError
from lungscreen.models.card import ModelCard, load_card
from lungscreen.models.rules import ClinicalRules
from lungscreen.server.config import Settings, SettingError, check_table
from lungscreen.server.tls import destination_tls, listener_tls


@dataclass(frozen=True)
class CheckedSettings:
    """What the checks built, for the server to use rather than build again."""

    settings: Settings
    card: ModelCard
    destinations: tuple[Destination, ...]


def check_settings(settings: Settings) -> CheckedSettings:
    """Every check, in the order a reader of the file meets the settings; raises
    :class:`~lungscreen.errors.ConfigurationError` (a :class:`SettingError` naming the setting) at the first problem."""
    _check_rules("clinical_rules", ClinicalRules, settings.clinical_rules)
    _check_rules("series_selection", SelectionRules, settings.series_selection)
    card = _check_model(settings)
    destinations = tuple(_check_destination(text) for text in settings.destination)
    _check_tls(settings)
    _check_data_dir(settings)
    return CheckedSettings(settings=settings, card=card, destinations=destinations)


def _check_rules(setting: str, rules_class: Any, table: dict[str, Any]) -> None:
    """Keys and types from the rules' own fields (with a suggestion for a misspelt key),
    then the rules' own constructor for what ties their values together."""
    if is_dataclass(rules_class):
        table = check_table(setting, rules_class, table)
    try:
        rules_class.from_mapping(table)
    except (ValueError, TypeError) as exc:
        raise SettingError(setting, str(exc)) from None


def _check_model(settings: Settings) -> ModelCard:
    """The card against its schema, its operating point, and its ONNX file as ONNX reads it."""
    import onnx  # the checker only: no inference session in the server process

    try:
        card = load_card(settings.model)
        card.operating_point(settings.operating_point)
    except ModelError as exc:
        raise SettingError("operating_point" if "operating point" in str(exc) else "model", str(exc)) from None
    try:
        onnx.checker.check_model(str(card.onnx_path))
    except Exception as exc:  # onnx raises ValidationError, protobuf's DecodeError or OSError
        raise SettingError("model", f"{card.onnx_path} is not a valid ONNX model: {exc}") from None
    if settings.providers:
        import onnxruntime

        known = onnxruntime.get_all_providers()
        unknown = [p for p in settings.providers if p not in known]
        if unknown:
            raise SettingError("providers", f"unknown ONNX Runtime provider(s) {unknown}; known: {', '.join(known)}")
    return card


def _check_destination(text: str) -> Destination:
    try:
        return Destination.parse(text)
    except ValueError as exc:
        raise SettingError("destination", str(exc)) from None


def _check_tls(settings: Settings) -> None:
    """Certificates, keys and CA bundles readable, each key matching its certificate (ssl's
    load_cert_chain refuses a mismatch); the messages name the settings."""
    for build, setting in ((listener_tls, "tls_cert"), (destination_tls, "destination_cert")):
        try:
            build(settings)
        except ValueError as exc:
            raise SettingError(setting, str(exc)) from None


def _check_data_dir(settings: Settings) -> None:
    """The data folder, or the folder it will be made in, is writable (nothing is created here)."""
    existing = settings.data_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SettingError("data_dir", f"{existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SettingError("data_dir", f"{existing} is not writable by this user")

