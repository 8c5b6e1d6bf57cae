"""Execute the book's notebooks with several worker processes into a fresh jupyter-cache.

``make book BOOK_JOBS=N`` (N > 1) runs this script, then ``jupyter-book build`` in ``cache`` mode on
the derived configuration it writes, so Jupyter Book only reads the stored outputs. The notebooks
are the ``.ipynb`` files named by ``_toc.yml`` that ``_config.yml`` neither excludes from the book
(``exclude_patterns``) nor from execution (``execute.exclude_patterns``). They start longest first
(:data:`SECONDS`, measured; unknown notebooks last, in table-of-contents order), each with its own
folder as working directory (as Jupyter Book runs them) and ``_config.yml``'s ``timeout`` and
``allow_errors``. The cache folder is deleted before every run, so no output of an earlier run (or
of older nclab code) can be served. Any failed notebook fails the command (exit 1) with its error.

Usage: ``python book/_ext/execute_book.py --jobs 2 --cache _build/.jupyter_cache_parallel
--config-out _build/_config_parallel.yml``
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import nbformat
import yaml

# Seconds each notebook took in the `real` profile on the 2-core CI machine (serial `make book`,
# 2405 s in all); only the order matters. The assignments took 7-12 s each.
SECONDS: dict[str, float] = {
    "book/05_finetuning.ipynb": 794,
    "book/03_source_collapse.ipynb": 722,
    "book/04_few_shot.ipynb": 353,
    "book/02_downstream_collapse.ipynb": 294,
    "book/01_neural_collapse.ipynb": 164,
    "book/00_quickstart.ipynb": 23,
    "book/assignments/01_nc1_from_scratch_student.ipynb": 12,
    "book/assignments/02_where_to_probe_student.ipynb": 10,
    "book/assignments/03_scl_convnext_student.ipynb": 10,
}


@dataclass
class Result:
    """One executed notebook: ``path`` relative to the book root, wall ``seconds`` from ``started``
    (epoch seconds), the executed notebook (JSON text) and, if it failed, the error with its cell and
    traceback."""

    path: str
    started: float
    seconds: float
    notebook: str
    error: str | None = None


def _toc_files(entry: Any) -> list[str]:
    """Every ``file`` named in a ``_toc.yml`` structure (``root`` included), in reading order."""
    out: list[str] = []
    if isinstance(entry, dict):
        for key in ("root", "file"):
            if isinstance(entry.get(key), str):
                out.append(entry[key])
        for value in entry.values():
            if isinstance(value, (list, dict)):
                out += _toc_files(value)
    elif isinstance(entry, list):
        for item in entry:
            out += _toc_files(item)
    return out


def _excluded(rel: str, patterns: list[str]) -> bool:
    """Whether ``rel`` (posix, relative to the root) matches a Sphinx-style exclude pattern (the
    pattern itself, or a folder the pattern names)."""
    from sphinx.util.matching import Matcher

    matcher = Matcher(patterns)
    parts = PurePosixPath(rel).parts
    return any(matcher("/".join(parts[:i])) for i in range(1, len(parts) + 1))


def notebooks(root: Path, config: dict[str, Any] | None = None) -> list[str]:
    """The notebooks the book executes (paths relative to ``root``), longest first by
    :data:`SECONDS`, unknown ones last in table-of-contents order."""
    config = _load(root / "_config.yml") if config is None else config
    toc = _load(root / "_toc.yml")
    book_excl = list(config.get("exclude_patterns") or [])
    exec_excl = list((config.get("execute") or {}).get("exclude_patterns") or [])
    found: list[str] = []
    for name in _toc_files(toc):
        rel = name if name.endswith(".ipynb") else name + ".ipynb"
        if not (root / rel).is_file() or rel in found or _excluded(rel, book_excl):
            continue
        # myst-nb skips execution when the notebook's path matches a pattern (PurePath.match)
        if any(PurePosixPath((root / rel).resolve().as_posix()).match(p) for p in exec_excl):
            continue
        found.append(rel)
    return sorted(found, key=lambda r: (r not in SECONDS, -SECONDS.get(r, 0.0), found.index(r)))


def _load(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def _say(line: str) -> None:
    """Print ``line`` in one write, so lines from the workers and the parent never interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _execute(root: str, rel: str, timeout: int | None, allow_errors: bool) -> Result:
    """Run one notebook in its own folder (worker process); never raises."""
    from jupyter_cache.executors.utils import single_nb_execution

    path = Path(root) / rel
    _say(f"execute_book: start {rel}")
    started, t0 = time.time(), time.perf_counter()
    try:
        nb = nbformat.read(path, as_version=4)
        res = single_nb_execution(nb, cwd=str(path.parent), timeout=timeout, allow_errors=allow_errors,
                                  meta_override=True)
        error = None if res.err is None else res.exc_string or str(res.err)
        return Result(rel, started, time.perf_counter() - t0, nbformat.writes(res.nb), error)
    except Exception:  # dead kernel, unreadable notebook...: reported as this notebook's failure
        return Result(rel, started, time.perf_counter() - t0, "", traceback.format_exc())


def execute(root: Path, cache: Path, jobs: int) -> list[Result]:
    """Execute :func:`notebooks` with ``jobs`` processes; store each success in a fresh cache at
    ``cache`` (deleted first). Prints one line per finished notebook. Returns results as finished."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    root = root.resolve()
    config = _load(root / "_config.yml")
    execute_cfg = config.get("execute") or {}
    if execute_cfg.get("run_in_temp"):
        raise SystemExit("execute_book: run_in_temp is not supported (notebooks run in their folder)")
    timeout = execute_cfg.get("timeout", 30)
    allow_errors = bool(execute_cfg.get("allow_errors", False))
    todo = notebooks(root, config)
    shutil.rmtree(cache, ignore_errors=True)
    store = get_cache(str(cache))
    print(f"execute_book: {len(todo)} notebooks, {jobs} workers, longest first: {', '.join(todo)}",
          flush=True)
    results: list[Result] = []
    # fork: the worker is this module's function even when it was loaded from a file path
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(_execute, str(root), rel, timeout, allow_errors) for rel in todo]
        for fut in as_completed(futures):
            r = fut.result()
            results.append(r)
            _say(f"execute_book: {r.path} {r.seconds:.1f} s {'ok' if r.error is None else 'failed'}")
            if r.error is None:
                store.cache_notebook_bundle(
                    CacheBundleIn(nbformat.reads(r.notebook, as_version=4), str(root / r.path),
                                  data={"execution_seconds": r.seconds}),
                    check_validity=False, overwrite=True)
            else:
                print(f"execute_book: {r.path} failed:\n{r.error}", file=sys.stderr, flush=True)
    return results


def write_config(root: Path, cache: Path, out: Path) -> None:
    """``_config.yml`` with ``execute_notebooks: cache`` reading ``cache`` (absolute path). Jupyter
    Book resolves ``sphinx.local_extensions`` against the config file's folder, so they are made
    absolute."""
    config = _load(root / "_config.yml")
    local = (config.get("sphinx") or {}).get("local_extensions") or {}
    for name, folder in local.items():
        local[name] = str((root / folder).resolve())
    config.setdefault("execute", {})
    config["execute"]["execute_notebooks"] = "cache"
    config["execute"]["cache"] = str(cache.resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Written by book/_ext/execute_book.py from _config.yml; do not edit.\n"
                   + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."), help="book root (holds _config.yml, _toc.yml)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--cache", type=Path, default=Path("_build/.jupyter_cache_parallel"),
                    help="jupyter-cache folder (deleted and rebuilt)")
    ap.add_argument("--config-out", type=Path, default=None,
                    help="write a copy of _config.yml in cache mode reading --cache here")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    t0 = time.perf_counter()
    results = execute(args.root, args.cache, args.jobs)
    failed = [r.path for r in results if r.error is not None]
    wall = time.perf_counter() - t0
    if failed:
        print(f"execute_book: {len(failed)} of {len(results)} notebooks failed ({', '.join(failed)}) "
              f"in {wall:.0f} s", flush=True)
        return 1
    if args.config_out is not None:
        write_config(args.root, args.cache, args.config_out)
    print(f"execute_book: {len(results)} notebooks executed in {wall:.0f} s, cached in {args.cache}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
