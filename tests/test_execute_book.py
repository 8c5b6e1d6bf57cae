"""book/_ext/execute_book.py: the book's notebooks run in parallel into a fresh jupyter-cache."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

_SCRIPT = Path(__file__).resolve().parents[1] / "book" / "_ext" / "execute_book.py"


def _module():
    spec = importlib.util.spec_from_file_location("execute_book", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["execute_book"] = mod
    spec.loader.exec_module(mod)
    return mod


eb = _module()


def _notebook(path: Path, *sources: str) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def _book(root: Path, ok: bool = True) -> None:
    """A book of three chapters (``b_long`` and ``c_mid`` in :data:`SECONDS`, ``a_short`` unknown), one
    notebook excluded from execution and one markdown page."""
    _notebook(root / "ch" / "a_short.ipynb", "import os\nprint('cwd', os.path.basename(os.getcwd()))")
    body = "print(6 * 7)" if ok else "raise ValueError('boom in b_long')"
    _notebook(root / "ch" / "b_long.ipynb", "import time\ntime.sleep(1)", body)
    _notebook(root / "ch" / "c_mid.ipynb", "import time\ntime.sleep(1)")
    _notebook(root / "ch" / "skipped.ipynb", "raise SystemExit('must not run')")
    (root / "intro.md").write_text("# Intro\n")
    toc = {"format": "jb-book", "root": "intro",
           "chapters": [{"file": "ch/a_short"}, {"file": "ch/b_long"}, {"file": "ch/c_mid"},
                        {"file": "ch/skipped"}]}
    (root / "_toc.yml").write_text(yaml.safe_dump(toc))
    config = {"title": "t", "exclude_patterns": ["_build"], "sphinx": {"local_extensions": {"ext": "_ext"}},
              "execute": {"execute_notebooks": "force", "timeout": 60, "allow_errors": False,
                          "exclude_patterns": ["*skipped.ipynb"]}}
    (root / "_config.yml").write_text(yaml.safe_dump(config))


@pytest.fixture()
def long_first(monkeypatch):
    monkeypatch.setattr(eb, "SECONDS", {"ch/b_long.ipynb": 100.0, "ch/c_mid.ipynb": 50.0})


def test_notebooks_longest_first_and_excludes(tmp_path, long_first):
    _book(tmp_path)
    assert eb.notebooks(tmp_path) == ["ch/b_long.ipynb", "ch/c_mid.ipynb", "ch/a_short.ipynb"]
    config = yaml.safe_load((tmp_path / "_config.yml").read_text())
    config["exclude_patterns"].append("ch/b_*")
    assert eb.notebooks(tmp_path, config) == ["ch/c_mid.ipynb", "ch/a_short.ipynb"]


def test_two_workers_fill_a_fresh_cache(tmp_path, long_first, capfd):
    from jupyter_cache import get_cache

    _book(tmp_path)
    cache = tmp_path / "_build" / "cache"
    cache.mkdir(parents=True)
    (cache / "stale.txt").write_text("from an earlier run")
    out = tmp_path / "_build" / "conf.yml"
    results = {r.path: r for r in eb.execute(tmp_path, cache, jobs=2)}
    eb.write_config(tmp_path, cache, out)
    text = capfd.readouterr().out
    assert set(re.findall(r"execute_book: (\S+) [0-9.]+ s ok", text)) == set(results)
    assert set(re.findall(r"execute_book: start (\S+\.ipynb)", text)) == set(results)
    assert not (cache / "stale.txt").exists()
    assert all(r.error is None for r in results.values())
    # two workers take the two longest at once; the unknown one starts when one of them has finished
    long, mid, short = (results[f"ch/{n}.ipynb"] for n in ("b_long", "c_mid", "a_short"))
    assert max(long.started, mid.started) < min(long.started + long.seconds, mid.started + mid.seconds)
    assert short.started >= min(long.started + long.seconds, mid.started + mid.seconds) - 0.05
    assert "skipped" not in text
    store = get_cache(str(cache))
    records = store.list_cache_records()
    assert len(records) == 3
    for rel, expected in [("ch/a_short.ipynb", "cwd ch"), ("ch/b_long.ipynb", "42")]:
        nb = nbformat.read(tmp_path / rel, as_version=4)
        record = store.match_cache_notebook(nb)  # what myst-nb's cache mode looks up
        cached = store.get_cache_bundle(record.pk).nb
        printed = "".join(o.get("text", "") for c in cached.cells for o in c.get("outputs", []))
        assert expected in printed
        assert record.data["execution_seconds"] > 0
    derived = yaml.safe_load(out.read_text())
    assert derived["execute"]["execute_notebooks"] == "cache"
    assert Path(derived["execute"]["cache"]) == cache.resolve()
    assert derived["execute"]["timeout"] == 60
    assert derived["sphinx"]["local_extensions"] == {"ext": str((tmp_path / "_ext").resolve())}


def test_failing_notebook_fails_the_command(tmp_path, long_first, capfd):
    _book(tmp_path, ok=False)
    cache = tmp_path / "cache"
    out = tmp_path / "conf.yml"
    rc = eb.main(["--root", str(tmp_path), "--jobs", "2", "--cache", str(cache), "--config-out", str(out)])
    captured = capfd.readouterr()
    assert rc == 1
    assert "ch/b_long.ipynb" in captured.out and "failed" in captured.out
    assert "ch/a_short.ipynb" in captured.out  # the other notebook still ran
    assert "boom in b_long" in captured.err and "ValueError" in captured.err
    assert not out.exists()  # no cache-mode config for a failed run
    from jupyter_cache import get_cache

    assert len(get_cache(str(cache)).list_cache_records()) == 2
