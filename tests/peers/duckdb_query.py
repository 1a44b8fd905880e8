"""Run SQL in DuckDB with the Delta extension loaded from the venv, and print the rows as JSON.

DuckDB is the independent Delta reader of the tests: whatever the collector writes must read back
through `delta_scan('<table path>')` here. The extension comes from the pinned
`duckdb-extension-delta` package; autoinstall and autoload are off, so nothing is ever fetched.

Usage:
    duckdb_query.py            SQL read from stdin; the rows of the last statement go to stdout as
                               a JSON array of objects (column name -> value)

Values JSON cannot hold (timestamps, decimals, bytes) are written as their string form.
"""

from __future__ import annotations

import json
import pathlib
import sys

import duckdb
import duckdb_extension_delta


def delta_extension() -> pathlib.Path:
    """The delta.duckdb_extension shipped for exactly this DuckDB version."""
    package = pathlib.Path(duckdb_extension_delta.__file__).parent
    wanted = package / "extensions" / f"v{duckdb.__version__}" / "delta.duckdb_extension"
    if wanted.is_file():
        return wanted
    found = sorted(package.rglob("delta.duckdb_extension"))
    raise SystemExit(
        f"no delta.duckdb_extension for DuckDB {duckdb.__version__} under {package} "
        f"(found: {[str(p) for p in found]}); pin duckdb and duckdb-extension-delta to one version"
    )


def main() -> int:
    sql = sys.stdin.read()
    con = duckdb.connect(
        ":memory:",
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False},
    )
    con.execute(f"LOAD '{delta_extension()}'")
    cursor = con.execute(sql)
    columns = [column[0] for column in cursor.description or []]
    rows = [dict(zip(columns, row)) for row in cursor.fetchall()] if columns else []
    json.dump(rows, sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
