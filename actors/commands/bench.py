"""`tpcluster bench`: the ratios of actors.bench, printed as one line or as JSON."""

from __future__ import annotations

import argparse
import json

from actors import bench  # cheap: the sections import torch and the cluster when they run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="*", choices=list(bench.SECTIONS))
    parser.add_argument("--soak-clients", type=int, default=8)
    parser.add_argument("--soak-seconds", type=float, default=60.0)
    parser.add_argument("--failover-minutes", type=float, default=10.0,
                        help="how long the failover section runs its load (a rank is killed every minute)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", metavar="PATH", help="write all figures as JSON")
    parser.add_argument("--chart", metavar="PATH", help="write a PNG chart of the ratios")
    parser.add_argument("--print-json", action="store_true", help="print the JSON instead of the one-line summary")


def run(args: argparse.Namespace) -> int:
    results = bench.run(args.only, args.repeats, args.json, args.chart, soak=(args.soak_clients, args.soak_seconds),
                        failover_minutes=args.failover_minutes)
    print(json.dumps(results, indent=1) if args.print_json else results["summary"])
    if not args.print_json:
        print(f"machine: {results['machine']}")
    return 0
