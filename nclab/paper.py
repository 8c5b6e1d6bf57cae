"""The numbers the paper reports, as one tidy table.

Every value of Li et al. (TMLR 2024) that the course puts beside its own results lives in
``nclab/resources/paper_numbers.csv``, one row per number with the columns ``source`` (where the
paper shows it: ``Table 3``, ``Fig. 10``, ``App. E.2``, ...), ``setting``, ``metric``, ``method``,
``value`` and ``std`` (empty where the paper gives none). A chapter quotes the paper through this
table, so the number in the text and the number in the paper cannot drift apart::

    >>> from nclab import paper
    >>> paper.value("Table 3", "R50 CIFAR-10", "acc", "Layer FT")
    94.6
    >>> paper.quote("Table 3", "R50 CIFAR-10", "acc", "Layer FT")
    '94.60 ± 0.11'

Conventions of the table: accuracies and parameter shares are in percent; ``metric="models"``
rows list the backbones of a source in ``method`` (``"; "``-separated) with their count as value;
axis ranges read off a figure are ``*_axis`` metrics with ``method`` ``min`` and ``max``; rows of an
appendix that describe the protocol of a table or figure name it at the start of ``setting``
(``App. E.2``, ``Table 2 CIFAR-FS``), and :func:`cited` collects them with that source.
"""

from __future__ import annotations

import difflib
import functools
from importlib import resources

import pandas as pd

__all__ = ["numbers", "value", "std", "quote", "sources", "models", "cited"]

_FILE = "paper_numbers.csv"
_KEYS = ("source", "setting", "metric", "method")


@functools.lru_cache(maxsize=1)
def _table() -> pd.DataFrame:
    with resources.files("nclab").joinpath("resources", _FILE).open("r", encoding="utf-8") as f:
        raw = pd.read_csv(f, dtype=str, keep_default_na=False)
    if list(raw.columns) != [*_KEYS, "value", "std"]:
        raise ValueError(f"{_FILE}: unexpected columns {list(raw.columns)}")
    dup = raw.duplicated(list(_KEYS), keep=False)
    if dup.any():
        raise ValueError(f"{_FILE}: duplicated keys\n{raw[dup].to_string()}")
    df = raw.rename(columns={"value": "value_text", "std": "std_text"})
    df["value"] = df.value_text.astype(float)
    df["std"] = pd.to_numeric(df.std_text.replace("", None), errors="raise").astype(float)
    return df[[*_KEYS, "value", "std", "value_text", "std_text"]]


def numbers() -> pd.DataFrame:
    """All numbers of the paper: ``source, setting, metric, method, value, std`` as floats (``std``
    NaN where the paper gives none) plus ``value_text``/``std_text`` exactly as the paper prints
    them. A fresh copy; change it freely."""
    return _table().copy()


def _row(source: str, setting: str, metric: str, method: str) -> pd.Series:
    df = _table()
    hit = df[(df.source == source) & (df.setting == setting) & (df.metric == metric) & (df.method == method)]
    if len(hit) == 1:
        return hit.iloc[0]
    key = " | ".join((source, setting, metric, method))
    keys = [" | ".join(k) for k in df[list(_KEYS)].itertuples(index=False)]
    close = difflib.get_close_matches(key, keys, n=5, cutoff=0.6)
    if not close:  # fall back to the rows of the same source
        close = [k for k in keys if k.startswith(source + " |")][:5]
    hint = "; close matches (source | setting | metric | method): " + ", ".join(repr(c) for c in close)
    raise KeyError(f"no paper number for {key!r}{hint if close else ''}")


def value(source: str, setting: str, metric: str, method: str = "") -> float:
    """The paper's value for one key, e.g. ``value("Table 3", "R50 CIFAR-10", "acc", "Layer FT")``.
    Raises ``KeyError`` naming the closest keys when there is no such row."""
    return float(_row(source, setting, metric, method).value)


def std(source: str, setting: str, metric: str, method: str = "") -> float:
    """The paper's standard deviation for one key, NaN where the paper reports none."""
    return float(_row(source, setting, metric, method)["std"])


def quote(source: str, setting: str, metric: str, method: str = "", *, unit: str = "") -> str:
    """The value as the paper prints it, with its std if it has one: ``"94.60 ± 0.11"``.
    ``unit`` is appended after a space, e.g. ``unit="%"`` gives ``"94.60 ± 0.11 %"``."""
    row = _row(source, setting, metric, method)
    text = row.value_text if not row.std_text else f"{row.value_text} ± {row.std_text}"
    return f"{text} {unit}" if unit else text


def sources() -> list[str]:
    """The sources the table covers, in the order of the file."""
    return list(dict.fromkeys(_table().source))


def models(source: str) -> list[str]:
    """The backbones the paper uses in ``source`` (empty if the table does not list them)."""
    rows = _table()
    rows = rows[(rows.source == source) & (rows.metric == "models")]
    return [m.strip() for text in rows.method for m in text.split(";") if m.strip()]


def _covers(tag: str, source: str, setting: str) -> bool:
    return source == tag or source.startswith(tag + ".") or setting == tag or setting.startswith(tag + " ")


def cited(tag: str) -> pd.DataFrame:
    """The rows a citation of ``tag`` (``"Table 2"``, ``"App. E"``, ``"Fig. 1"``) vouches for: the
    rows of that source, of its sub-appendices (``App. E`` covers ``App. E.1``) and the protocol rows
    of other sources whose setting starts with ``tag`` (``App. E.2 | Table 2 CIFAR-FS``)."""
    df = _table()
    mask = [_covers(tag, s, t) for s, t in zip(df.source, df.setting)]
    return df[mask].copy()
