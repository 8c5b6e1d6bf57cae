"""The assignments: student versions in sync with the solutions and free of solution code; solutions
execute and score full marks; student versions execute with NotImplementedError as the only error
and score zero. The solutions stay private: only in book/instructors/solutions/, which the book and
the wheel leave out and no student notebook names. Also the generator's rules on small cells and the
``nclab`` command.

A public copy of the course has no solutions folder: the tests that need the solutions are then
skipped (with the reason) and the student notebooks are still executed and scored."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest

from nclab import assignments as A
from nclab.cli import main

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / A.SOLUTION_FOLDER  # the instructors' solutions
STUDENT_FOLDER = ROOT / A.STUDENT_FOLDER  # the published student versions
HAVE_SOLUTIONS = FOLDER.is_dir()
SOLUTIONS = A.solution_paths(FOLDER) if HAVE_SOLUTIONS else []
STUDENTS = sorted(STUDENT_FOLDER.glob("*_student.ipynb"))
needs_solutions = pytest.mark.skipif(
    not HAVE_SOLUTIONS, reason=f"no {A.SOLUTION_FOLDER}/: a public copy without the solutions")
SCORE = re.compile(r"^Assignment \d+: .*?: ([\d.]+) / ([\d.]+) points", re.M)


def _course(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the first solution in a fresh ``<book>/instructors/solutions`` under tmp_path."""
    sols = tmp_path / "book" / "instructors" / "solutions"
    sols.mkdir(parents=True)
    (tmp_path / "book" / "assignments").mkdir()
    copy_sol = sols / SOLUTIONS[0].name
    copy_sol.write_bytes(SOLUTIONS[0].read_bytes())
    return sols, copy_sol


def test_three_student_notebooks_that_never_name_the_solutions():
    assert len(STUDENTS) >= 3
    for path in STUDENTS:
        text = path.read_text(encoding="utf-8")
        assert "_solution" not in text and "instructors/solutions" not in text, path


def test_solutions_only_in_the_private_folder_and_left_out_of_book_and_wheel():
    book = ROOT / "book"
    stray = [p for p in book.rglob("*_solution*") if not p.is_relative_to(FOLDER)]
    assert not stray, f"solution files outside {A.SOLUTION_FOLDER}: {stray}"
    assert not list((ROOT / "nclab").rglob("*_solution*")), "a solution inside the package"
    toc = (ROOT / "_toc.yml").read_text(encoding="utf-8")
    assert "_solution" not in toc and "instructors/solutions" not in toc
    for path in STUDENTS:
        assert f"file: {path.relative_to(ROOT).with_suffix('').as_posix()}\n" in toc, path
    link = re.compile(r"\]\([^)]*(_solution|instructors/solutions)|"
                      r"\{(doc|download|nb-download|ref)\}`[^`]*(_solution|instructors/solutions)")
    for page in book.rglob("*.md"):
        assert not link.search(page.read_text(encoding="utf-8")), f"{page} links a solution"
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    assert {"book/instructors", "book/instructors/**", "**/*_solution.ipynb"} <= set(
        config["exclude_patterns"])


@needs_solutions
def test_three_assignments_with_solution_cells():
    assert len(SOLUTIONS) >= 3
    assert [A.student_path(s) for s in SOLUTIONS] == STUDENTS
    for path in SOLUTIONS:
        nb = nbformat.read(path, as_version=4)
        assert any(A.SOLUTION_TAG in c.metadata.get("tags", []) for c in nb.cells), path
        assert all(not c.get("outputs") for c in nb.cells), f"{path}: commit without outputs"


@needs_solutions
def test_student_versions_in_sync_and_clean(tmp_path):
    assert A.check_assignments(FOLDER) == []
    for sol in SOLUTIONS:
        out = A.make_student(sol, tmp_path / A.student_path(sol).name)
        assert out.read_bytes() == A.student_path(sol).read_bytes(), f"{sol} out of sync"
        solution = nbformat.read(sol, as_version=4)
        student = nbformat.read(out, as_version=4)
        body = A.solution_body_lines(solution)
        assert len(body) >= 3
        lines = {ln.strip() for c in student.cells for ln in c.source.splitlines()}
        assert not [ln for ln in body if ln in lines], "solution code in the student version"
        assert not [ln for ln in body if len(ln) > 30 and ln in "\n".join(lines)]
        by_id = {c.id: c for c in student.cells}
        for cell in solution.cells:
            tags = cell.metadata.get("tags", [])
            twin = by_id[cell.id]
            if A.SOLUTION_TAG in tags:
                assert A.SOLUTION_TAG not in twin.metadata.get("tags", [])
                assert A.STUB_TAG in twin.metadata["tags"]
                if cell.cell_type == "code":
                    assert "raise NotImplementedError(" in twin.source
                    assert "HINT" not in twin.source
            else:
                assert twin.source == cell.source


@needs_solutions
def test_check_finds_stale_and_leaking_student(tmp_path):
    sols, copy_sol = _course(tmp_path)
    assert any("missing" in p for p in A.check_assignments(sols))
    stu = A.make_student(copy_sol)
    assert stu == tmp_path / "book" / "assignments" / A.student_path(SOLUTIONS[0]).name
    assert A.check_assignments(sols) == []
    nb = nbformat.read(stu, as_version=4)
    solution = nbformat.read(copy_sol, as_version=4)
    leaked = A.solution_body_lines(solution)[0]
    nb.cells[-1].source += "\n" + leaked
    stu.write_text(A.render(nb), encoding="utf-8")
    problems = A.check_assignments(sols)
    assert any("out of sync" in p for p in problems)
    assert any("solution code" in p for p in problems)
    assert main(["check-assignments", str(sols)]) == 1
    assert main(["make-student", str(copy_sol)]) == 0
    assert main(["check-assignments", str(sols)]) == 0


@needs_solutions
def test_solutions_stay_in_their_folder_and_students_in_theirs(tmp_path, capsys):
    sols, copy_sol = _course(tmp_path)
    public = tmp_path / "book" / "assignments"
    assert A.student_folder(sols) == public
    assert A.student_folder(Path("book/instructors/solutions")) == Path("book/assignments")
    assert A.student_path(copy_sol).parent == public
    # a solution in the public folder (or anywhere else) is refused, not turned into a student
    # version beside it
    stray = public / copy_sol.name
    stray.write_bytes(copy_sol.read_bytes())
    with pytest.raises(ValueError, match="not a solutions folder"):
        A.student_path(stray)
    with pytest.raises(ValueError, match="not a solutions folder"):
        A.make_student(stray)
    with pytest.raises(ValueError, match="not a solutions folder"):
        A.solution_paths(public)
    assert main(["make-student", str(public)]) == 2
    assert "not a solutions folder" in capsys.readouterr().err
    # ... and reported by the check, like a solution anywhere else in the book
    A.make_student(copy_sol)
    (tmp_path / "book" / "extra_solution.ipynb").write_bytes(copy_sol.read_bytes())
    problems = A.check_assignments(sols)
    assert sum("outside" in p for p in problems) == 2, problems
    stray.unlink()
    (tmp_path / "book" / "extra_solution.ipynb").unlink()
    # a student version is never written into the solutions folder or over a solution
    for bad in (sols / A.student_path(copy_sol).name, copy_sol, sols / "sub" / "x_student.ipynb"):
        with pytest.raises(ValueError):
            A.make_student(copy_sol, bad)
    assert not (sols / A.student_path(copy_sol).name).exists()
    assert main(["make-student", str(copy_sol), "--out", str(sols / "x_student.ipynb")]) == 2
    assert "not written into the solutions folder" in capsys.readouterr().err
    # an orphan student version and one that names the solutions are reported
    (public / "zz_student.ipynb").write_bytes(A.student_path(copy_sol).read_bytes())
    assert any("has no solution notebook" in p for p in A.check_assignments(sols))
    (public / "zz_student.ipynb").unlink()
    nb = nbformat.read(copy_sol, as_version=4)
    nb.cells[0].source += "\n\nSee the instructors/solutions folder."
    copy_sol.write_text(A.render(nb), encoding="utf-8")
    A.make_student(copy_sol)
    assert any("names the private solutions" in p for p in A.check_assignments(sols))
    # run from inside the solutions folder, '.' still maps to the students' folder
    cwd = os.getcwd()
    try:
        os.chdir(sols)
        assert A.student_path(copy_sol.name).resolve() == A.student_path(copy_sol).resolve()
    finally:
        os.chdir(cwd)


def test_stub_rules():
    src = ("import torch\n\n# HINT: divide by N\ndef f(h, y):\n    \"\"\"Doc.\"\"\"\n"
           "    n = len(h)\n    return h.sum() / n\n\n\nclass M:\n    \"\"\"M.\"\"\"\n\n"
           "    def g(self):\n        # HINT: inner hint\n        return 1\n\n\nf(1, 2)\n")
    out = A.stub_code(src, hint="cell hint")
    assert "import torch" in out and "f(1, 2)" in out and '"""Doc."""' in out
    assert 'raise NotImplementedError("divide by N")' in out
    assert 'raise NotImplementedError("inner hint")' in out
    assert "n = len(h)" not in out and "return 1" not in out and "HINT" not in out
    assert 'raise NotImplementedError("cell hint")' in A.stub_code("def z():\n    return 0\n",
                                                                   "cell hint")
    with pytest.raises(ValueError, match="does not parse"):
        A.stub_code("def broken(:\n")
    with pytest.raises(ValueError, match="own lines"):
        A.stub_code("def one(): return 1\n")


def test_generator_needs_solution_cells_and_names():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    with pytest.raises(ValueError, match="no cell is tagged"):
        A.student_notebook(nb)
    with pytest.raises(ValueError, match="_solution.ipynb"):
        A.student_path("foo.ipynb")
    assert main(["make-student", "does/not/exist.ipynb"]) == 2


def _execute(path: Path) -> tuple[nbformat.NotebookNode, list]:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_ok = os.environ.get("NCLAB_PROFILE", "smoke") == "smoke"
    assert env_ok, "run the notebook tests in the smoke profile"
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [(c, o) for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    return nb, errors


def _score(nb) -> tuple[float, float]:
    text = "".join(o.get("data", {}).get("text/plain", "") for o in nb.cells[-1].outputs)
    m = SCORE.search(text)
    assert m, f"no score in the grading cell's output: {text[:300]!r}"
    return float(m.group(1)), float(m.group(2))


@needs_solutions
@pytest.mark.parametrize("sol", SOLUTIONS, ids=lambda p: p.stem)
def test_solution_executes_with_full_marks(sol, monkeypatch):
    monkeypatch.setenv("NCLAB_PROFILE", "smoke")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb, errors = _execute(sol)
    assert not errors, [(c.id, o.ename, o.evalue) for c, o in errors]
    points, max_points = _score(nb)
    assert max_points > 0 and points == max_points


@pytest.mark.parametrize("student", STUDENTS, ids=lambda p: p.stem)
def test_student_executes_with_only_not_implemented_and_scores_zero(student, monkeypatch):
    monkeypatch.setenv("NCLAB_PROFILE", "smoke")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb, errors = _execute(student)
    # the stubs' NotImplementedError is summarised in one line per cell, never a traceback
    assert not errors, [(c.id, o.ename, o.evalue) for c, o in errors]
    for c in nb.cells:
        if c.cell_type == "code" and A.STUB_TAG in c.metadata.get("tags", []):
            text = "".join(o.get("text", "") for o in c.outputs if o.output_type == "stream")
            assert text.count("not implemented yet") == 1, (c.id, text)
            assert len(text.strip().splitlines()) == 1, (c.id, text)
    points, max_points = _score(nb)
    assert points == 0 and max_points > 0
    grade = "".join(o.get("data", {}).get("text/plain", "") for o in nb.cells[-1].outputs)
    lines = grade.strip().splitlines()
    checks = len(lines) - 1
    assert checks >= 2 and all("not implemented yet" in ln for ln in lines[1:]), grade
    assert grade.count("not implemented yet") == checks  # one line per check, no repeated hints


@needs_solutions
def test_cli_help_and_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "make-student" in capsys.readouterr().out
    assert main(["make-student", str(SOLUTIONS[0]), str(SOLUTIONS[1]), "--out", "x.ipynb"]) == 2
    assert "--out needs exactly one" in capsys.readouterr().err
