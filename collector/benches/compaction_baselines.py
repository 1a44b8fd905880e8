"""The baselines of collector/benches/compaction.rs, and the counts that check every engine.

    compaction_baselines.py duckdb  INPUT OUTPUT   dedupe + date-partitioned Parquet with DuckDB
    compaction_baselines.py pyspark INPUT OUTPUT   the same with PySpark in local mode
    compaction_baselines.py count-parquet FOLDER   distinct (gateway, seq) in a Parquet folder
    compaction_baselines.py count-delta TABLE      distinct (gateway, seq) in a Delta table

Timings cover the work only and are printed as `seconds=S` (and `startup=S` for PySpark's JVM
and session); counts as `distinct=N`. The date is the UTC calendar date of `ts`.
"""

import os
import sys
import time


def duckdb_connect():
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    return con


def run_duckdb(input_dir, output_dir):
    con = duckdb_connect()
    started = time.perf_counter()
    con.execute(
        f"""
        COPY (
            SELECT DISTINCT ON (gateway, seq) *, CAST(ts AS DATE) AS date
            FROM read_parquet('{input_dir}/**/*.parquet')
        ) TO '{output_dir}' (FORMAT PARQUET, PARTITION_BY (date), COMPRESSION ZSTD)
        """
    )
    print(f"seconds={time.perf_counter() - started:.3f}")


def run_pyspark(input_dir, output_dir):
    started = time.perf_counter()
    from pyspark.sql import SparkSession, functions as F

    spark = (
        SparkSession.builder.master("local[*]")
        .appName("plantline-compaction-baseline")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.sql.parquet.compression.codec", "zstd")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    print(f"startup={time.perf_counter() - started:.3f}")
    started = time.perf_counter()
    (
        spark.read.parquet(f"{input_dir}/raw/*/*.parquet")
        .dropDuplicates(["gateway", "seq"])
        .withColumn("date", F.to_date("ts"))
        .write.partitionBy("date")
        .mode("overwrite")
        .parquet(output_dir)
    )
    print(f"seconds={time.perf_counter() - started:.3f}")
    spark.stop()


def count_parquet(folder):
    con = duckdb_connect()
    (n,) = con.execute(
        f"SELECT count(*) FROM (SELECT DISTINCT gateway, seq FROM read_parquet('{folder}/**/*.parquet'))"
    ).fetchone()
    print(f"distinct={n}")


def count_delta(table):
    import duckdb
    import duckdb_extension_delta

    con = duckdb.connect(
        ":memory:",
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False},
    )
    con.execute("SET TimeZone = 'UTC'")
    package = os.path.dirname(duckdb_extension_delta.__file__)
    extension = os.path.join(package, "extensions", f"v{duckdb.__version__}", "delta.duckdb_extension")
    con.execute(f"LOAD '{extension}'")
    (n,) = con.execute(
        f"SELECT count(*) FROM (SELECT DISTINCT gateway, seq FROM delta_scan('{table}'))"
    ).fetchone()
    print(f"distinct={n}")


def main(argv):
    if len(argv) == 4 and argv[1] == "duckdb":
        run_duckdb(argv[2], argv[3])
    elif len(argv) == 4 and argv[1] == "pyspark":
        run_pyspark(argv[2], argv[3])
    elif len(argv) == 3 and argv[1] == "count-parquet":
        count_parquet(argv[2])
    elif len(argv) == 3 and argv[1] == "count-delta":
        count_delta(argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
