"""``python -m pytest_ditredundancy merge shard-*.json --report index.html [--json merged.json] [--profiles-dir DIR]``,
``python -m pytest_ditredundancy plan --dit-model=NAME [--gpu-memory=80GB]`` (see docs/capture-plan.md) and
``python -m pytest_ditredundancy options [--markdown]`` (the plugin's options; ``--markdown``: docs/options.md).

Exit status: 0 when every merged suite passed and no test is missing, 1 when something failed or is
missing, 2 when the shards cannot be merged (the message says why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pytest_ditredundancy",
                                     description="pytest-ditredundancy command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("merge", help="merge shard runs (--dit-shard=K/N --dit-json=...) into one report",
                            description="Combine the JSON of every shard of a run into one report and one merged "
                                        "profile per model; the suites are judged on the merged profiles.")
    m.add_argument("shards", nargs="+", type=Path, help="shard JSON files (from --dit-json), one per shard")
    m.add_argument("--report", type=Path, help="write the HTML report here")
    m.add_argument("--json", type=Path, help="write the merged report's JSON here")
    m.add_argument("--profiles-dir", type=Path, help="write one merged profile per model and settings here "
                                                     "(<dir>/<model>/<settings key>.json)")
    m.add_argument("--baseline-dir", type=Path, help="baselines to judge against (default: the shards' "
                                                     "--dit-baseline-dir, relative to the directory the merge "
                                                     "runs in, e.g. the root of a checkout)")
    p = commands.add_parser("plan", help="capture sites and memory of a full-size model, built without weights",
                            description="Build the real transformer of a registered model on the meta device "
                                        "(no weights, no memory), list its capture sites and the capture's memory "
                                        "at the model's default size, frames and guidance.")
    p.add_argument("--dit-model", required=True, help="registered full-size model(s), comma-separated, or 'all'")
    p.add_argument("--gpu-memory", help="GPU size to check the fit against, e.g. 80GB (10^9) or 80GiB (2^30)")
    p.add_argument("--kinds", default=None, help="capture only these kinds, e.g. a,a_text (default: all)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call (default 1)")
    o = commands.add_parser("options", help="the pytest plugin's options: ini key, type, default, valid values",
                            description="List every --dit-* option of the pytest plugin with its ini key, type, "
                                        "default and valid values.")
    o.add_argument("--markdown", action="store_true", help="print the options reference as markdown "
                                                            "(python -m pytest_ditredundancy options --markdown "
                                                            "> docs/options.md)")
    return parser


def _print_options(markdown: bool) -> int:
    from .plugin.options import options_markdown, options_table

    if markdown:
        print(options_markdown(), end="")
        return 0
    for names, ini, kind, default, valid, help_text in options_table()[1:]:
        facts = [f"ini {ini}", kind, f"default {default}" if default else "", f"valid: {valid}" if valid else ""]
        print(f"{names.replace('`', '')} ({'; '.join(f for f in facts if f).replace('`', '')})\n    {help_text}")
    return 0


def _output_problem(args: argparse.Namespace) -> str | None:
    """Why the merge could not write what it was asked to, found before the shards are read and replayed."""
    from .plugin.report_collector import unwritable

    if args.report and args.json and args.report.resolve() == args.json.resolve():
        return (f"--report and --json both name {args.report}: the JSON would overwrite the HTML report; give them "
                "different paths")
    shards = {shard.resolve() for shard in args.shards}
    in_folder = "a file path in a folder that can be written"
    outputs = [("--report", args.report, args.report, in_folder), ("--json", args.json, args.json, in_folder),
               ("--profiles-dir", args.profiles_dir, args.profiles_dir and args.profiles_dir / "profile.json",
                "a folder that can be written")]
    for flag, given, written, wanted in outputs:
        if given is None:
            continue
        if given.resolve() in shards:
            return f"{flag} {given} is one of the shards: it would be overwritten; give another path"
        problem = unwritable(written)  # for the profiles: a file inside the folder
        if problem:
            return f"{flag} {given}: cannot write there ({problem}); give {wanted}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "options":
        return _print_options(args.markdown)
    if args.command == "plan":
        from .profiling.capture_plan_text import run_plan

        return run_plan(args.dit_model, gpu_memory=args.gpu_memory, kinds=args.kinds, batch_size=args.batch_size)
    from .plugin.merge import MergeError, merge  # the merge replays the suites: it needs the plugin (and pytest)

    if not (args.report or args.json or args.profiles_dir):
        print("merge: nothing to write: give --report, --json and/or --profiles-dir", file=sys.stderr)
        return 2
    problem = _output_problem(args)
    if problem:
        print(f"merge: error: {problem}", file=sys.stderr)
        return 2
    try:
        doc = merge(args.shards, report=args.report, json_path=args.json, profiles_dir=args.profiles_dir,
                    baseline_dir=args.baseline_dir)
    except MergeError as exc:
        print(f"merge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a report location that cannot be written
        print(f"merge: error: {exc}", file=sys.stderr)
        return 2
    baselines = args.baseline_dir or Path(doc["run"]["baseline_dir"])
    if not baselines.is_dir():
        print(f"merge: note: no baseline directory {baselines} here (the shards' --dit-baseline-dir, relative to the "
              "directory the merge runs in): run the merge from the root of the checkout, or pass --baseline-dir",
              file=sys.stderr)
    for entry in doc["models"]:
        print(f"{entry['model']}: {entry['status']}; " + "; ".join(
            f"{suite['title']} {'ok' if suite['passed'] else 'FAIL'} ({suite['headline']})"
            for suite in entry["suites"].values()))
    for record in doc["cross_model"]:
        print(f"{record['model']}: between/within {record['value']} {'ok' if record['passed'] else 'FAIL'}")
    missing = doc["tests"]["missing"]
    if missing:
        print(f"{len(missing)} tests without a result: " + ", ".join(m["nodeid"] for m in missing))
    for label, path in (("HTML report", args.report), ("JSON report", args.json), ("profiles", args.profiles_dir)):
        if path:
            print(f"{label}: {path}")
    return 1 if doc["status"] != "passed" else 0


if __name__ == "__main__":
    sys.exit(main())
