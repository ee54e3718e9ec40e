"""The passport index's contract: passports keyed by ``(scan_id, model_key)``, each write conditional on
``created_at`` so a late retry of an old run can never replace a newer result. Two stores implement it:
:mod:`ray_app.storage.dynamodb` (AWS) and :mod:`ray_app.storage.sqlite` (one machine)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from datetime import datetime, timezone

from ray_app.core.errors import InvalidPassport
from ray_app.storage.keys import validate_id


class PassportRecord:
    """The indexed fields of a passport, validated once for both stores."""

    def __init__(self, passport: dict, job_id: str):
        if not isinstance(passport, dict):
            raise InvalidPassport(f"passport must be a dict, got {type(passport).__name__}")
        self.scan_id = validate_id(passport.get("scan_id"), "passport scan_id")
        model = passport.get("model")
        if not isinstance(model, dict):
            raise InvalidPassport("passport has no 'model' dict", scan_id=self.scan_id)
        self.model_key = validate_id(model.get("key"), "passport model.key")
        self.job_id = validate_id(job_id, "job_id")
        self.status = passport.get("status")
        if not isinstance(self.status, str) or not self.status:
            raise InvalidPassport("passport has no 'status' string", scan_id=self.scan_id)
        self.created_at = passport.get("created_at")
        self.order_key = order_key(self.created_at, self.scan_id)
        try:
            self.json = json.dumps(passport, allow_nan=True, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise InvalidPassport(f"passport is not JSON-serialisable: {exc}", scan_id=self.scan_id) from exc


def order_key(created_at: object, scan_id: str) -> str:
    """``created_at`` as fixed-width UTC text, so string order is time order (needed by DynamoDB conditions).

    A timestamp without an offset is taken as UTC, which the passport contract promises.
    """
    if not isinstance(created_at, str):
        raise InvalidPassport("passport has no 'created_at' string", scan_id=scan_id)
    try:
        dt = datetime.fromisoformat(created_at)
    except ValueError as exc:
        raise InvalidPassport(f"created_at {created_at!r} is not ISO-8601", scan_id=scan_id) from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class PassportStore(ABC):
    """The latest passport per ``(scan_id, model_key)``, plus lookups by job."""

    @abstractmethod
    def put(self, passport: dict, job_id: str, passport_uri: str | None = None) -> bool:
        """Store unless the stored item has a newer ``created_at``; returns whether it wrote.

        ``passport_uri``: where the same passport was written in full (``passport.json``); a store may then keep a
        compact record that points there instead of a copy."""

    @abstractmethod
    def get(self, scan_id: str, model_key: str) -> dict | None:
        """The full passport, or None."""

    def status(self, scan_id: str, model_key: str) -> str | None:
        """The stored passport's status (``ok``, ``failed``, ...), or None when there is none: the resume check."""
        passport = self.get(scan_id, model_key)
        return None if passport is None else passport.get("status")

    def statuses(self, scan_ids: list[str], model_key: str) -> dict[str, tuple[str, str | None]]:
        """``scan_id -> (status, error code)`` for those of ``scan_ids`` with a stored passport: the resume check of
        many scans at once. Stores override it with one batched read instead of one per scan."""
        found: dict[str, tuple[str, str | None]] = {}
        for scan_id in scan_ids:
            doc = self.get(scan_id, model_key)
            if doc is not None:
                found[scan_id] = (str(doc.get("status")), (doc.get("error") or {}).get("code"))
        return found

    @abstractmethod
    def get_latest(self, scan_id: str) -> dict | None:
        """The newest passport of this scan over all models."""

    @abstractmethod
    def list_by_job(self, job_id: str) -> list[dict]:
        """Passports last written by this job, sorted by ``(scan_id, model_key)``."""

    @abstractmethod
    def delete(self, scan_id: str, model_key: str) -> None: ...

    def is_done(self, scan_id: str, model_key: str) -> bool:
        """Whether a successful passport is stored, so a rerun can skip the scan."""
        return self.status(scan_id, model_key) == "ok"
