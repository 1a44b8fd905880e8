"""Drive an S3 endpoint (the moto server in the tests) with boto3, as an independent S3 client.

Usage (every command takes --endpoint URL):
    s3ctl.py --endpoint URL create-bucket BUCKET
    s3ctl.py --endpoint URL put BUCKET KEY          object body read from stdin
    s3ctl.py --endpoint URL get BUCKET KEY          object body written to stdout
    s3ctl.py --endpoint URL list BUCKET [PREFIX]    one key per line, sorted
    s3ctl.py --endpoint URL download BUCKET PREFIX DIR
                                                    every object under PREFIX to DIR/<key minus PREFIX>

Credentials and region are the fixed test values the harness also gives to the code under test.
A missing object exits with status 2 and "NoSuchKey: BUCKET/KEY" on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

ACCESS_KEY = "plantline-test"
SECRET_KEY = "plantline-test-secret"
REGION = "us-east-1"


def client(endpoint: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def keys(s3, bucket: str, prefix: str) -> list[str]:
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.extend(item["Key"] for item in page.get("Contents", []))
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", required=True)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("create-bucket").add_argument("bucket")
    for name in ("put", "get"):
        sub = commands.add_parser(name)
        sub.add_argument("bucket")
        sub.add_argument("key")
    listing = commands.add_parser("list")
    listing.add_argument("bucket")
    listing.add_argument("prefix", nargs="?", default="")
    download = commands.add_parser("download")
    download.add_argument("bucket")
    download.add_argument("prefix")
    download.add_argument("dir")
    args = parser.parse_args()

    s3 = client(args.endpoint)
    try:
        if args.command == "create-bucket":
            s3.create_bucket(Bucket=args.bucket)
        elif args.command == "put":
            s3.put_object(Bucket=args.bucket, Key=args.key, Body=sys.stdin.buffer.read())
        elif args.command == "get":
            body = s3.get_object(Bucket=args.bucket, Key=args.key)["Body"].read()
            sys.stdout.buffer.write(body)
        elif args.command == "list":
            for key in keys(s3, args.bucket, args.prefix):
                print(key)
        elif args.command == "download":
            for key in keys(s3, args.bucket, args.prefix):
                relative = key[len(args.prefix):].lstrip("/")
                target = os.path.join(args.dir, relative)
                os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
                s3.download_file(args.bucket, key, target)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "ClientError")
        where = f"{args.bucket}/{getattr(args, 'key', '')}".rstrip("/")
        print(f"{code}: {where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
