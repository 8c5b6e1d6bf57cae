"""The ``nclab`` command: instructor tools for the assignments.

    nclab make-student [PATH ...] [--out FILE]   write <name>_student.ipynb from <name>_solution.ipynb
    nclab check-assignments [FOLDER]             exit 1 if a student version is stale or leaks code
    nclab check-quotes PATH [PATH ...]           exit 1 if a quote of the paper disagrees with it
    nclab fetch [--profile P] [--dry-run]        download what profile P needs (before class)
    nclab rehearsal-weights [--profile P]        random-init weights for a rehearsal (make rehearse)

The solutions are in ``book/instructors/solutions/`` (private: not in the book, the wheel or a
public copy); the student versions are written to ``book/assignments/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlparse

from . import assignments, runtime

DEFAULT_FOLDER = assignments.SOLUTION_FOLDER


def _solutions(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in paths or [str(DEFAULT_FOLDER)]:
        path = Path(p)
        if path.is_dir():
            out += assignments.solution_paths(path)
        elif path.is_file():
            out.append(path)
        else:
            raise ValueError(f"{path} does not exist (give solution notebooks or a folder)")
    return out


def _make_student(args: argparse.Namespace) -> int:
    sols = _solutions(args.paths)
    if args.out is not None and len(sols) != 1:
        raise ValueError(f"--out needs exactly one solution notebook, got {len(sols)}")
    for sol in sols:
        out = assignments.make_student(sol, args.out)
        print(f"{sol} -> {out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    problems = assignments.check_assignments(args.folder)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if not problems:
        n = len(assignments.solution_paths(args.folder))
        print(f"{n} assignment(s) in {args.folder}: student versions in sync, no solution code")
    return 1 if problems else 0


def _check_quotes(args: argparse.Namespace) -> int:
    from . import quotes

    files, failures = quotes.scan_paths(args.paths, root=Path.cwd())
    for f in failures:
        print(f"{f}\n", file=sys.stderr)
    print(f"{len(files)} file(s) read: {len(failures)} paper quote(s) disagree with "
          "nclab/resources/paper_numbers.csv" if failures else
          f"{len(files)} file(s) read: every paper quote agrees with nclab/resources/paper_numbers.csv")
    return 1 if failures else 0


def _fetch(args: argparse.Namespace) -> int:
    from . import fetch

    items = fetch.plan(args.profile)
    name = args.profile or runtime.profile().name
    if args.dry_run:
        print(fetch.format_plan(items, name))
        return 0
    results = fetch.fetch(items, timeout=args.timeout, progress=not args.no_progress)
    failed = [it for it, state in results if state not in ("present", "fetched", "manual")]
    files = [it for it in items if it.kind != "manual"]
    total, exact = fetch.total_size(items)
    print(f"profile {name}: {len(files) - len(failed)} of {len(files)} file(s) in place "
          f"({fetch.human_size(total, exact)} planned); {len(items) - len(files)} to get by hand")
    if failed:
        hosts = sorted({urlparse(it.url).netloc for it in failed})
        print(f"error: {len(failed)} file(s) not fetched (FAILED above; from {', '.join(hosts)})",
              file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nclab", description="nclab instructor tools: student versions of the assignments, paper "
                       "quotes, and fetching a profile's downloads before class.")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser(
        "make-student",
        help="write the student version of solution notebooks",
        description="Write <book>/assignments/<name>_student.ipynb for each "
                    "<book>/instructors/solutions/<name>_solution.ipynb: cells tagged "
                    "'solution' become stubs raising NotImplementedError with the '# HINT:' text, "
                    "tagged 'raises-exception'; outputs are stripped. The output is deterministic.")
    make.add_argument("paths", nargs="*", metavar="PATH",
                      help=f"solution notebooks or folders holding them (default {DEFAULT_FOLDER})")
    make.add_argument("--out", type=Path, default=None,
                      help="output file <name>_student.ipynb, not in the solutions folder "
                           "(only with a single solution notebook)")
    make.set_defaults(func=_make_student)
    check = sub.add_parser(
        "check-assignments",
        help="check that student versions are in sync and contain no solution code",
        description="Regenerate every student version in memory and compare byte for byte; check "
                    "stub tags and that no solution body line appears in a student notebook, and "
                    "that no solution notebook lies in the book outside the solutions folder. "
                    "Exits 1 on any problem.")
    check.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER,
                       help=f"the solutions folder (default {DEFAULT_FOLDER})")
    check.set_defaults(func=_check)
    cq = sub.add_parser(
        "check-quotes",
        help="check the paper quotes of notebooks and markdown pages against the paper's numbers",
        description="Read the markdown of the notebooks (.ipynb) and pages (.md) given or found under "
                    "the folders given, and report every sentence or table that quotes the paper "
                    "(names it and a Table/Fig./App.) with a number, backbone or source that is not in "
                    "nclab/resources/paper_numbers.csv at the printed precision (conventions: "
                    "nclab.quotes). Exits 1 on any disagreeing quote.")
    cq.add_argument("paths", nargs="+", metavar="PATH", help="notebooks, .md pages or folders")
    cq.set_defaults(func=_check_quotes)
    fe = sub.add_parser(
        "fetch",
        help="download every dataset and weight file a profile needs (resumable, verified)",
        description="Download what the chapters and assignments of a profile read from the network: "
                    "torchvision datasets (MD5), torchvision ImageNet weights (SHA-256 prefix), "
                    "timm/open_clip weights (Hugging Face cache), the local mirror (SHA-256), into the "
                    "folders the loaders read, so that the course then runs offline. A partial "
                    "download resumes. --dry-run prints the plan (files, origins, sizes, total). "
                    "Exits 1 when a file could not be fetched (each unreachable host fails within "
                    "--timeout seconds).")
    fe.add_argument("--profile", choices=("smoke", "real", "course", "paper"), default=None,
                    help="the profile (default: $NCLAB_PROFILE, else course with CUDA, smoke without)")
    fe.add_argument("--dry-run", action="store_true", help="print the plan, download nothing")
    fe.add_argument("--timeout", type=float, default=5.0,
                    help="seconds to wait for an origin host to answer (default 5)")
    fe.add_argument("--no-progress", action="store_true", help="no progress bars")
    fe.set_defaults(func=_fetch)
    rw = sub.add_parser(
        "rehearsal-weights",
        help="write random-init ImageNet/CLIP weights into scratch caches for a rehearsal",
        description="For a rehearsal of the course (NCLAB_REHEARSAL=1, see `make rehearse`): write "
                    "random-init weights for every torchvision/timm/open_clip file the profile "
                    "loads, at the paths of the torch hub and Hugging Face caches, which must be "
                    "scratch folders named by TORCH_HOME and HF_HOME. Never real weights.")
    rw.add_argument("--profile", choices=("course", "paper"), default=None,
                    help="the profile to rehearse (default: $NCLAB_PROFILE)")
    rw.set_defaults(func=_rehearsal_weights)
    return parser


def _rehearsal_weights(args: argparse.Namespace) -> int:
    from .rehearse import write_weights

    try:  # refuses outside a rehearsal (NCLAB_REHEARSAL=1) and without scratch caches
        paths = write_weights(args.profile)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"rehearsal: {len(paths)} random-init weight files written")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nclab`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
