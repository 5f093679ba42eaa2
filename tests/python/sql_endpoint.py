#!/usr/bin/env python3
"""Queries walbridge's SQL endpoint with psycopg 3, a client nobody here wrote.

Connects to 127.0.0.1:PORT as USER (password from PGPASSWORD), runs a parameterised query
(psycopg binds server-side: the extended protocol) and a plain count, and prints one JSON
object: {"negative": [[sku, warehouse, available], ...], "count": n}. Exits 1 on any error.

    sql_endpoint.py --port PORT --user USER
"""

import argparse
import json
import sys

import psycopg


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", required=True)
    args = p.parse_args()
    try:
        with psycopg.connect(
            host="127.0.0.1", port=args.port, user=args.user, dbname="walbridge", connect_timeout=10
        ) as conn:
            with conn.cursor() as cur:
                cur.execute(
                    "select sku, warehouse, available from stock_availability"
                    " where available < %s order by sku",
                    (0,),
                )
                negative = [list(r) for r in cur.fetchall()]
                cur.execute("select count(*) from stock_availability")
                (count,) = cur.fetchone()
    except psycopg.Error as e:
        print(f"sql_endpoint.py: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"negative": negative, "count": count}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
