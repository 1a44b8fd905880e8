#!/usr/bin/env bash
# Runs the compaction benchmark (collector/benches/compaction.rs) against DuckDB and PySpark.
# Makes the PySpark venv (${PLANTLINE_CACHE:-~/.cache/plantline}/venv/pyspark, about 450 MB from
# PyPI) when it is missing; PySpark 4 needs Java 17 or newer on the PATH. DuckDB's venv comes from
# ./tests/run.sh --install-only. Not part of CI: it takes several minutes and a JVM.
#   collector/benches/compaction.sh                       800 files, 2,000,000 rows
#   PLANTLINE_BENCH_FILES=80 PLANTLINE_BENCH_ROWS=200000 collector/benches/compaction.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cache="${PLANTLINE_CACHE:-$HOME/.cache/plantline}"
python="${PLANTLINE_PYTHON:-python3}"
java -version >/dev/null 2>&1 || { echo "compaction.sh: PySpark needs Java 17+ (Debian: apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
if [[ ! -x "$cache/venv/duckdb/bin/python" ]]; then
  ./tests/run.sh --install-only
fi
if [[ ! -x "$cache/venv/pyspark/bin/python" ]] || ! "$cache/venv/pyspark/bin/python" -c 'import pyspark' 2>/dev/null; then
  "$python" -m venv "$cache/venv/pyspark"
  "$cache/venv/pyspark/bin/pip" install --quiet 'pyspark==4.0.1'
fi
exec cargo bench -p collector --bench compaction
