"""Student versions of assignment notebooks, generated from the solutions and checked for sync.

An assignment is one *solution* notebook ``<name>_solution.ipynb`` whose solution cells carry the
cell tag ``solution``. :func:`student_notebook` turns it into the student version
``<name>_student.ipynb``.

Where they live (paths relative to the repository root): the solutions in
:data:`SOLUTION_FOLDER` (``book/instructors/solutions/``), which the published book
(``exclude_patterns`` in ``_config.yml``) and the ``nclab`` wheel leave out and a public copy of
the course omits; the student versions in :data:`STUDENT_FOLDER` (``book/assignments/``), listed
in the book's table of contents. The mapping is fixed: ``<book>/instructors/solutions/x_solution.ipynb``
-> ``<book>/assignments/x_student.ipynb`` (:func:`student_path`). A solution notebook anywhere
else, or a student version aimed at the solutions folder, is an error, and
:func:`check_assignments` reports a solution notebook found elsewhere in the book.

The conversion:

* a code solution cell keeps its top-level statements (imports, the lines that try the functions)
  and the signature and docstring of every top-level function (and of every method of a top-level
  class); each body becomes one line raising ``NotImplementedError("<hint>")``. The hint is
  the text of the ``# HINT:`` comment lines above or inside that function, else the cell's
  ``metadata["hint"]``, else a generic one. ``# HINT:`` lines themselves are dropped;
* a markdown solution cell (a written answer) becomes an answer placeholder with the hint;
* stub cells lose the ``solution`` tag and gain ``raises-exception`` (the book build and nbval then
  accept the expected ``NotImplementedError``); given cells tagged ``calls-solution`` (they run
  the student's code) also gain ``raises-exception``;
* every output and execution count is stripped.

The conversion is a pure function of the solution notebook and the file is written in nbformat's
canonical JSON, so :func:`check_assignments` can regenerate and compare byte for byte, and also
checks that no line of a solution body appears anywhere in the student version.

Grading needs no solution file: the grading cell calls :mod:`nclab.grading`, which draws its hidden
cases from a seed at run time and compares with nclab's own implementation (or a property).
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
from pathlib import Path

import nbformat

__all__ = [
    "SOLUTION_TAG",
    "STUB_TAG",
    "CALLS_TAG",
    "DEFAULT_HINT",
    "SOLUTION_FOLDER",
    "STUDENT_FOLDER",
    "stub_code",
    "stub_markdown",
    "student_notebook",
    "student_folder",
    "student_path",
    "solution_paths",
    "render",
    "make_student",
    "solution_body_lines",
    "leaked_lines",
    "check_assignments",
]

SOLUTION_TAG = "solution"
STUB_TAG = "raises-exception"
CALLS_TAG = "calls-solution"
STUB_ERROR = "NotImplementedError"  # what a stub raises (the graders score it as "not implemented")
SOLUTION_SUFFIX = "_solution.ipynb"
STUDENT_SUFFIX = "_student.ipynb"
#: The instructors' solution notebooks (relative to the repository root): private, not published.
SOLUTION_FOLDER = Path("book") / "instructors" / "solutions"
#: The generated student notebooks (relative to the repository root): published in the book.
STUDENT_FOLDER = Path("book") / "assignments"
_SOLUTION_PARTS = SOLUTION_FOLDER.parts[1:]  # ("instructors", "solutions") below the book folder
_STUDENT_PARTS = STUDENT_FOLDER.parts[1:]  # ("assignments",)
DEFAULT_HINT = "write your implementation here"
_HINT = re.compile(r"^\s*#\s*HINT:\s?(.*)$")
_COMMENT = re.compile(r"^\s*#")
_MIN_LEAK_CHARS = 8  # shorter body lines (``pass``, ``)``, ``return h``) are too generic to flag


# --------------------------------------------------------------------------- one cell
def _hints_in(lines: list[str], lo: int, hi: int) -> list[str]:
    """Text of the ``# HINT:`` lines among ``lines[lo:hi]`` (0-based, half-open)."""
    return [m.group(1).strip() for ln in lines[lo:hi] if (m := _HINT.match(ln))]


def _doc_end(node: ast.AST) -> int | None:
    """1-based last line of the docstring of a def/class, or None."""
    body = getattr(node, "body", [])
    if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        return body[0].end_lineno
    return None


def _header_lines(lines: list[str], node: ast.AST) -> list[str]:
    """Decorators, signature and docstring of a def/class, without comment-only lines."""
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    doc = _doc_end(node)
    body_start = node.body[0].lineno
    end = doc if doc is not None else body_start - 1
    if doc is None and node.body[0].lineno == node.lineno:  # one-liner: def f(): return 1
        raise ValueError(f"line {node.lineno}: put the body of {node.name!r} on its own lines so "
                         "that it can be replaced by a stub")
    return [ln for ln in lines[start - 1:end] if not _COMMENT.match(ln) and ln.strip()]


def _raise_line(indent: str, hint: str) -> str:
    return f"{indent}raise {STUB_ERROR}({json.dumps(hint, ensure_ascii=False)})"


def _stub_def(lines: list[str], node: ast.AST, hint: str) -> list[str]:
    indent = " " * node.body[0].col_offset
    own = _hints_in(lines, node.lineno - 1, node.end_lineno)
    return _header_lines(lines, node) + [_raise_line(indent, " ".join(own) or hint)]


def _stub_class(lines: list[str], node: ast.ClassDef, hint: str) -> list[str]:
    out = _header_lines(lines, node)
    methods = [m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for m in methods:
        out.append("")
        before = _hints_in(lines, (m.lineno - 2), m.lineno - 1)
        out += _stub_def(lines, m, " ".join(before) or hint)
    if not methods:
        out.append(_raise_line(" " * node.body[0].col_offset, hint))
    return out


def stub_code(source: str, hint: str | None = None) -> str:
    """The student stub of one code solution cell (rules in the module docstring).

    ``hint`` is the fallback for functions without a ``# HINT:`` of their own."""
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise ValueError(f"a solution cell does not parse (line {err.lineno}: {err.msg}); fix it "
                         "before generating the student version") from err
    lines = source.splitlines()
    fallback = hint or DEFAULT_HINT
    out: list[str] = []
    cursor = 0  # 0-based index of the first line not yet emitted
    for node in tree.body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        gap = lines[cursor:start]
        before = [m.group(1).strip() for ln in gap if (m := _HINT.match(ln))]
        out += [ln for ln in gap if not _HINT.match(ln)]
        node_hint = " ".join(before) or fallback
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out += _stub_def(lines, node, node_hint)
        elif isinstance(node, ast.ClassDef):
            out += _stub_class(lines, node, node_hint)
        else:
            out += [ln for ln in lines[start:node.end_lineno] if not _HINT.match(ln)]
        cursor = node.end_lineno
    out += [ln for ln in lines[cursor:] if not _HINT.match(ln)]
    while out and not out[-1].strip():
        out.pop()
    while out and not out[0].strip():
        out.pop(0)
    return "\n".join(out)


def stub_markdown(source: str, hint: str | None = None) -> str:
    """The placeholder for a written-answer (markdown) solution cell."""
    text = "**Your answer.** *Replace this text with your answer.*"
    return text + (f"\n\n*Hint:* {hint}" if hint else "")


# --------------------------------------------------------------------------- notebook
def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _set_tags(cell, tags: list[str]) -> None:
    uniq = list(dict.fromkeys(tags))
    if uniq:
        cell.metadata["tags"] = uniq
    else:
        cell.metadata.pop("tags", None)


def _clean(cell) -> None:
    for key in ("execution", "collapsed", "scrolled", "ExecuteTime"):
        cell.metadata.pop(key, None)
    if cell.cell_type == "code":
        cell.outputs = []
        cell.execution_count = None


def student_notebook(solution: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The student version of a solution notebook (a new notebook; the input is not modified)."""
    nb = copy.deepcopy(solution)
    nb.metadata.pop("widgets", None)
    found = False
    for cell in nb.cells:
        _clean(cell)
        tags = _tags(cell)
        if SOLUTION_TAG in tags:
            found = True
            hint = cell.metadata.pop("hint", None)
            if cell.cell_type == "code":
                cell.source = stub_code(cell.source, hint)
            elif cell.cell_type == "markdown":
                cell.source = stub_markdown(cell.source, hint)
            else:
                raise ValueError(f"a {cell.cell_type} cell is tagged {SOLUTION_TAG!r}; only code "
                                 "and markdown cells can be solution cells")
            _set_tags(cell, [t for t in tags if t != SOLUTION_TAG] + [STUB_TAG])
        elif CALLS_TAG in tags:
            _set_tags(cell, [t for t in tags if t != CALLS_TAG] + [STUB_TAG])
    if not found:
        raise ValueError(f"no cell is tagged {SOLUTION_TAG!r}: tag the solution cells (cell "
                         "metadata 'tags') before generating a student version")
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    """Canonical notebook text (nbformat 4, sorted keys, one-space indent, final newline)."""
    nbformat.validate(nb)
    text = nbformat.writes(nb, version=4)
    return text if text.endswith("\n") else text + "\n"


def student_folder(solution_folder: str | Path) -> Path:
    """``<book>/instructors/solutions`` -> ``<book>/assignments``, where the student versions go.

    ``ValueError`` for any other folder: solution notebooks are only handled inside a solutions
    folder, so that a solution never sits in (or is regenerated into) a published folder. A
    relative path gives a relative result."""
    folder = Path(solution_folder)
    n = len(_SOLUTION_PARTS)
    if folder.parts[-n:] != _SOLUTION_PARTS:
        folder = Path(os.path.abspath(folder))  # '.', '..' (e.g. run from inside the folder)
    if folder.parts[-n:] != _SOLUTION_PARTS:
        raise ValueError(
            f"{solution_folder} is not a solutions folder: solution notebooks live in "
            f"'<book>/{'/'.join(_SOLUTION_PARTS)}/' ({SOLUTION_FOLDER}/ in this repository), which the "
            f"book and the package leave out; their student versions go to '<book>/"
            f"{'/'.join(_STUDENT_PARTS)}/'")
    return folder.parents[n - 1].joinpath(*_STUDENT_PARTS)


def student_path(solution: str | Path) -> Path:
    """``<book>/instructors/solutions/x_solution.ipynb`` -> ``<book>/assignments/x_student.ipynb``.

    ``ValueError`` if the name does not end in ``_solution.ipynb`` or the notebook is not in a
    solutions folder (:func:`student_folder`)."""
    solution = Path(solution)
    if not solution.name.endswith(SOLUTION_SUFFIX):
        raise ValueError(f"{solution}: solution notebooks are named '<name>{SOLUTION_SUFFIX}'")
    name = solution.name[: -len(SOLUTION_SUFFIX)] + STUDENT_SUFFIX
    return student_folder(solution.parent) / name


def solution_paths(folder: str | Path) -> list[Path]:
    """The solution notebooks in the solutions folder ``folder`` (sorted); ``ValueError`` if it is
    missing (e.g. a public copy of the course, which has no solutions), is not a solutions folder
    (:func:`student_folder`) or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder (the solutions are kept in {SOLUTION_FOLDER}/ of "
                         "the instructors' copy of the course; a public copy has none)")
    student_folder(folder)
    found = sorted(folder.glob(f"*{SOLUTION_SUFFIX}"))
    if not found:
        raise ValueError(f"no '*{SOLUTION_SUFFIX}' notebooks in {folder}")
    return found


def _within(path: Path, folder: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(Path(os.path.abspath(folder)))


def make_student(solution: str | Path, out: str | Path | None = None) -> Path:
    """Write the student version of ``solution`` to ``out`` (default :func:`student_path`).

    ``ValueError`` if ``solution`` is not in a solutions folder, or if ``out`` is not named
    ``<name>_student.ipynb`` or lies inside the solutions folder (the book leaves that folder out, so
    the published student version would silently stay stale)."""
    solution = Path(solution)
    default = student_path(solution)
    out = Path(out) if out is not None else default
    if not out.name.endswith(STUDENT_SUFFIX):
        raise ValueError(f"{out}: student notebooks are named '<name>{STUDENT_SUFFIX}'")
    if _within(out, solution.parent):
        raise ValueError(f"{out}: a student version is not written into the solutions folder "
                         f"{solution.parent}; it belongs in {default.parent}")
    nb = nbformat.read(solution, as_version=4)
    out.write_text(render(student_notebook(nb)), encoding="utf-8")
    return out


# --------------------------------------------------------------------------- checks
def solution_body_lines(solution: nbformat.NotebookNode) -> list[str]:
    """The lines a student must write: function/method bodies (without docstrings and comments)
    of code solution cells and the text of markdown solution cells, stripped, at least
    ``_MIN_LEAK_CHARS`` long. Computed from the solution alone (not from the generator)."""
    found: list[str] = []
    for cell in solution.cells:
        if SOLUTION_TAG not in _tags(cell):
            continue
        lines = cell.source.splitlines()
        if cell.cell_type == "markdown":
            found += [ln.strip() for ln in lines if len(ln.strip()) >= _MIN_LEAK_CHARS]
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = node.body[0]
            doc = _doc_end(node)
            lo = doc if doc is not None else first.lineno - 1
            for ln in lines[lo:node.end_lineno]:
                s = ln.strip()
                if len(s) >= _MIN_LEAK_CHARS and not s.startswith("#") and not s.startswith("def "):
                    found.append(s)
    return list(dict.fromkeys(found))


def leaked_lines(solution: nbformat.NotebookNode, student: nbformat.NotebookNode) -> list[str]:
    """Solution body lines (:func:`solution_body_lines`) that appear in any student cell."""
    present = {ln.strip() for cell in student.cells for ln in cell.source.splitlines()}
    present |= {ln.strip() for cell in student.cells for out in cell.get("outputs", [])
                for ln in str(out.get("text", "")).splitlines()}
    return [ln for ln in solution_body_lines(solution) if ln in present]


def check_assignments(folder: str | Path) -> list[str]:
    """Problems with the assignments whose solutions are in the solutions folder ``folder``
    (empty list = all good): a missing or stale student version, solution code in a student
    version, a student version that names the solutions' file or folder, a stub cell without
    ``raises-exception`` or still tagged ``solution``, a student version without a solution, and a
    ``*_solution.ipynb`` anywhere in the book outside ``folder`` (it could be published)."""
    folder = Path(folder)
    problems = []
    sols = solution_paths(folder)
    stu_folder = student_folder(folder)
    book = stu_folder.parent
    for stray in sorted(book.rglob(f"*{SOLUTION_SUFFIX}")):
        if not _within(stray, folder):
            problems.append(f"{stray} is a solution notebook outside {folder}: move it there (only "
                            "that folder is kept out of the book and of a public copy)")
    expected_students = {student_path(s).name for s in sols}
    for orphan in sorted(stu_folder.glob(f"*{STUDENT_SUFFIX}")):
        if orphan.name not in expected_students:
            problems.append(f"{orphan} has no solution notebook in {folder}")
    private_names = ("/".join(_SOLUTION_PARTS), SOLUTION_SUFFIX)
    for sol_path in sols:
        stu_path = student_path(sol_path)
        sol = nbformat.read(sol_path, as_version=4)
        try:
            expected = render(student_notebook(sol))
        except ValueError as err:
            problems.append(f"{sol_path}: {err}")
            continue
        if not stu_path.exists():
            problems.append(f"{stu_path} is missing: run `nclab make-student {sol_path}`")
            continue
        if stu_path.read_text(encoding="utf-8") != expected:
            problems.append(f"{stu_path} is out of sync with {sol_path.name}: run "
                            f"`nclab make-student {sol_path}`")
        stu = nbformat.read(stu_path, as_version=4)
        named = [n for n in private_names if any(n in c.source for c in stu.cells)]
        if named:
            problems.append(f"{stu_path} names the private solutions ({named}): students are not "
                            "told where the solutions are")
        leaks = leaked_lines(sol, stu)
        if leaks:
            problems.append(f"{stu_path} contains solution code: {leaks[:3]}")
        stu_cells = {c.get("id"): c for c in stu.cells}
        for cell in sol.cells:
            if SOLUTION_TAG not in _tags(cell):
                continue
            twin = stu_cells.get(cell.get("id"))
            if twin is None:
                problems.append(f"{stu_path}: the stub of solution cell {cell.get('id')} is missing")
            elif SOLUTION_TAG in _tags(twin) or STUB_TAG not in _tags(twin):
                problems.append(f"{stu_path}: cell {cell.get('id')} must be tagged {STUB_TAG!r} "
                                f"and not {SOLUTION_TAG!r}, has {_tags(twin)}")
    return problems
