"""Headless runs: compute the book's tables without rendering it.

    python -m llfc_core run --profile cpu                    # every table of every chapter
    python -m llfc_core run --profile cpu --settings mnist-mlp,cifar10-mlp --recompute
    python -m llfc_core run --estimate --profile paper   # minutes per setting on this device; computes nothing
    python -m llfc_core share --source cpu --target paper --settings mnist-mlp,cifar10-mlp  # same hash: copy rows

Tables go to results/<profile>/ with the manifest, as when the chapters compute them; settings whose
committed rows match their configuration are read, not recomputed (unless --recompute). Afterwards
`make book` renders from those tables.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import chapter
from .tables import CHAPTER_TABLES, table_settings


def run(profile: str | None, settings: str | None, recompute: bool, chapters: list[str]) -> None:
    os.environ.setdefault("LLFC_STRICT_CLAIMS", "1")  # a headless run fails on an unexplained claim
    for name in chapters:
        ch = chapter.start(name, profile, settings, recompute)
        for table in CHAPTER_TABLES[name]:
            if table_settings(table, ch.settings) != []:  # a table no chosen setting is part of (the spawn study) is skipped
                ch.table(table)
        ch.report()  # records the chapter's minutes when it computed something


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llfc_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="compute every table of the chosen chapters into results/<profile>/")
    p.add_argument("--profile", default=None, help="smoke, cpu or paper (default: $LLFC_PROFILE, else by device)")
    p.add_argument("--settings", default=None, help="comma-separated setting names (default: all of the profile)")
    p.add_argument("--chapters", default=",".join(CHAPTER_TABLES), help="comma-separated chapter names")
    p.add_argument("--recompute", action="store_true", help="recompute even where committed rows match")
    p.add_argument("--estimate", action="store_true",
                   help="print the estimated minutes per setting and in total of a cold run on this device "
                        "(a few timed training steps per model), compute nothing else, exit")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="with --estimate: train in this precision (default: each recipe's, by the device's policy)")
    p.add_argument("--budget", type=float, default=None,
                   help="with --estimate: also say which profile fits this many minutes (book.estimate.choose_profile)")
    q = sub.add_parser("share", help="copy settings' committed rows to another profile where their configuration "
                                     "hashes are equal (results.share)")
    q.add_argument("--source", required=True)
    q.add_argument("--target", required=True)
    q.add_argument("--settings", required=True, help="comma-separated setting names")
    args = parser.parse_args(argv)
    if args.command == "share":
        return share(parser, args.source, args.target, args.settings)
    chapters = [c.strip() for c in args.chapters.split(",") if c.strip()]
    unknown = sorted(set(chapters) - set(CHAPTER_TABLES))
    if unknown:
        parser.error(f"unknown chapters {unknown}; choose from {sorted(CHAPTER_TABLES)}")
    try:  # an unknown profile or setting is a usage error, found before any chapter computes
        for name in chapters:
            chapter.resolve(name, args.profile, args.settings)
    except KeyError as e:
        parser.error(e.args[0])
    if args.estimate and args.precision:
        from ..runtime import default_device, training_precision

        try:  # fp16 on the CPU is refused, as training would refuse it
            training_precision(default_device(), args.precision)
        except ValueError as e:
            parser.error(str(e))
    if args.estimate:
        estimate(args.profile, args.settings, chapters, args.precision, args.budget)
        return 0
    if args.precision or args.budget is not None:
        parser.error("--precision and --budget go with --estimate")
    run(args.profile, args.settings, args.recompute, chapters)
    return 0


def estimate(profile: str | None, settings: str | None, chapters: list[str], precision: str | None = None,
             budget: float | None = None) -> None:
    """`run --estimate`: minutes per (chapter, setting) and in total of a cold run here (book.estimate)."""
    from ..runtime import configure_threads, default_device
    from .estimate import choose_profile, report

    configure_threads()
    profile = chapter.resolve(chapters[0], profile, settings)[0]
    report(profile, default_device(), chapters=chapters, settings=settings, precision=precision)
    if budget is not None:
        chosen, reason = choose_profile(default_device(), budget)
        print(f"for a budget of {budget:g} min: {reason}")


def share(parser, source: str, target: str, names: str) -> int:
    """`share`: every table of every chapter, per setting, copied where the target's hash equals the source's."""
    from . import profiles, results
    from .tables import TABLES, results_hash

    try:
        chosen = profiles.get_settings(target, names)
        profiles.get_settings(source, names)
    except KeyError as e:
        parser.error(e.args[0])
    for name, setting in chosen.items():
        hashes = {t: results_hash(t, setting) for t in TABLES if not t.startswith("width_")}
        copied = results.share(source, target, name, hashes)
        print(f"{name}: {len(copied)} tables copied from {source} to {target}: {', '.join(copied) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
