"""``hms store backup``: an online copy of an SQLite store, with SQLite's backup API."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import urllib.parse
from typing import Any

from hms_mgmt.errors import StoreError
from hms_mgmt.store.sqlite_schema import store_error


def backup(source: str, destination: str) -> dict[str, Any]:
    """An online, consistent copy of the store at ``source`` (SQLite's backup API), checked.

    Safe beside a running engine: it reads a snapshot and never writes the store.
    """
    began = time.monotonic()
    if not os.path.isfile(source):
        raise StoreError(
            f"there is no store at {source}"
            + ("" if os.path.isabs(source) else f" ({os.path.abspath(source)})")
            + ": --store-url or HMS_STORE_URL names it",
            kind="unopenable",
        )
    partial = destination + ".partial"
    try:
        reader = sqlite3.connect(
            f"file:{urllib.parse.quote(os.path.abspath(source))}?mode=ro", uri=True
        )
        try:
            try:
                writer = sqlite3.connect(partial)
            except sqlite3.Error as exc:
                raise StoreError(
                    f"cannot write the backup {destination}: a missing or read-only folder, "
                    f"or no permission ({exc})",
                    kind="unopenable",
                ) from None
            try:
                reader.backup(writer)
                if writer.execute("PRAGMA quick_check").fetchall() != [("ok",)]:
                    raise StoreError(f"the copy of {source} does not check out", kind="corrupt")
                workflows = writer.execute("SELECT count(*) FROM workflows").fetchone()[0]
            finally:
                writer.close()
        finally:
            reader.close()
        os.replace(partial, destination)
    except sqlite3.Error as exc:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise store_error(source, exc) from None
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise StoreError(f"cannot write the backup {destination}: {exc.strerror or exc}") from None
    return {
        "source": source,
        "path": destination,
        "workflows": workflows,
        "bytes": os.path.getsize(destination),
        "seconds": round(time.monotonic() - began, 3),
    }
