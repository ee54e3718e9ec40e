"""The passport index in one SQLite file: the laptop and single-machine store, same contract as DynamoDB's."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ray_app.core.errors import StorageError
from ray_app.storage.passports import PassportRecord, PassportStore

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS passports (
    scan_id TEXT NOT NULL,
    model_key TEXT NOT NULL,
    job_id TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    order_key TEXT NOT NULL,
    passport TEXT NOT NULL,
    PRIMARY KEY (scan_id, model_key)
);
CREATE INDEX IF NOT EXISTS passports_job_id ON passports (job_id);
"""

_SQLITE_PUT = """
INSERT INTO passports (scan_id, model_key, job_id, status, created_at, order_key, passport)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (scan_id, model_key) DO UPDATE SET
    job_id = excluded.job_id, status = excluded.status, created_at = excluded.created_at,
    order_key = excluded.order_key, passport = excluded.passport
WHERE excluded.order_key >= passports.order_key
"""


class SQLitePassportStore(PassportStore):
    """One local file (WAL mode, safe for several processes on one machine; not for network filesystems).

    The passport is stored as JSON text, so it comes back exactly as put.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._db() as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SQLITE_SCHEMA)
        except (OSError, sqlite3.Error) as exc:  # a file where the folder should be, no permission, not SQLite
            raise StorageError(f"cannot open passport store {self.path}: {exc}") from exc

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # A connection per call: sqlite3 connections must not cross threads, and opening one is cheap.
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    def put(self, passport: dict, job_id: str, passport_uri: str | None = None) -> bool:
        """Keeps the whole passport (a local file costs nothing per byte); ``passport_uri`` is not needed."""
        rec = PassportRecord(passport, job_id)
        row = (rec.scan_id, rec.model_key, rec.job_id, rec.status, rec.created_at, rec.order_key, rec.json)
        with self._db() as conn:
            return conn.execute(_SQLITE_PUT, row).rowcount == 1

    def _one(self, sql: str, args: tuple) -> dict | None:
        with self._db() as conn:
            row = conn.execute(sql, args).fetchone()
        return None if row is None else json.loads(row[0])

    def get(self, scan_id: str, model_key: str) -> dict | None:
        return self._one("SELECT passport FROM passports WHERE scan_id = ? AND model_key = ?", (scan_id, model_key))

    def get_latest(self, scan_id: str) -> dict | None:
        return self._one(
            "SELECT passport FROM passports WHERE scan_id = ? ORDER BY order_key DESC, model_key DESC LIMIT 1",
            (scan_id,),
        )

    def list_by_job(self, job_id: str) -> list[dict]:
        with self._db() as conn:
            rows = conn.execute(
                "SELECT passport FROM passports WHERE job_id = ? ORDER BY scan_id, model_key", (job_id,)
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def status(self, scan_id: str, model_key: str) -> str | None:
        with self._db() as conn:
            row = conn.execute(
                "SELECT status FROM passports WHERE scan_id = ? AND model_key = ?", (scan_id, model_key)
            ).fetchone()
        return None if row is None else row[0]

    def statuses(self, scan_ids: list[str], model_key: str) -> dict[str, tuple[str, str | None]]:
        """One ``SELECT ... IN (...)`` per 900 ids (under SQLite's oldest limit of 999 parameters)."""
        found: dict[str, tuple[str, str | None]] = {}
        unique = list(dict.fromkeys(scan_ids))
        with self._db() as conn:
            for start in range(0, len(unique), 900):
                chunk = unique[start : start + 900]
                rows = conn.execute(
                    "SELECT scan_id, status, json_extract(passport, '$.error.code') FROM passports "
                    f"WHERE model_key = ? AND scan_id IN ({','.join('?' * len(chunk))})",
                    (model_key, *chunk),
                )
                found.update((sid, (status, code)) for sid, status, code in rows)
        return found

    def delete(self, scan_id: str, model_key: str) -> None:
        with self._db() as conn:
            conn.execute("DELETE FROM passports WHERE scan_id = ? AND model_key = ?", (scan_id, model_key))
