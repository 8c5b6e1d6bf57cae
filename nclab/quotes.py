"""Check the paper quotes of a course's pages against the paper's numbers (``nclab.paper``).

``nclab check-quotes PATH ...`` (or :func:`scan_paths`) reads the markdown of notebooks and
``.md`` pages and reports every quote of Li et al. (TMLR 2024) whose numbers, backbones or source
disagree with ``nclab/resources/paper_numbers.csv``. The course checks its own pages with it in
``tests/test_paper.py``; an instructor can run it on their own notebooks the same way.

Quoting convention for chapter authors
--------------------------------------
Write a paper quote as a sentence that names the paper and the source that prints the number, in
the paper's precision: "... as the paper reports (Table 3: 94.60 ± 0.11 %)" or "The paper's Fig. 10
(ResNet-50) puts the turning point near a source NC1 of 1.0". Give our own numbers in their own
sentence, or in a clause or parenthetical that says they are ours ("our ResNet12: 12.4 M
parameters").

What the scanner checks
-----------------------
It reads every markdown cell of the notebooks (``*.ipynb``) and every ``*.md`` page given, or found
under a folder given (``_build`` and ``.ipynb_checkpoints`` folders are skipped). A sentence is a
quote when it mentions the paper ("paper", "Li et al.", "the authors", the citation key; not inside
code) together with a source tag (``Table 3``, ``Fig. 2``, ``Figure 10``, ``App. B``, ``App. E.2``,
or a tag of the section heading above); a sentence right after a quote that starts with
"Its"/"Their" or speaks of "the figure", "the table", "the panels" or "the axes" continues that
quote. For a quote it checks

* every number is a value of *that* source in ``nclab/resources/paper_numbers.csv`` (see
  ``nclab.paper.cited``: ``Table 2`` also covers its protocol rows in ``App. E.2``) to the printed
  precision: ``92 %`` matches 92.07, half up; a range ``0.8–1.3`` needs both ends; an accuracy may be
  a fraction with three or more decimals (``0.946``), an r² a percentage; ``X ± Y`` needs that std;
* every backbone it names (ResNet-50, ViT-B/32, ...) is one the source uses;
* the source is in the table at all.

A sentence that mentions the paper and quotes a number but gives no source fails too (name the
table, figure or appendix); there only the parts that name the paper count.

Numbers that are not quoted values are skipped: the tag's own number, model and dataset names
(ResNet-50, CIFAR-100, VTAB-1k), labels (Block 8, Layer 8, level 3, seeds 0–2, Exercise 4, eq. 4),
sizes (224 px, 32×32, ``$d = 2048$``), compounds (5-shot, 2-layer), years, citation keys, code
spans and math other than a bare value (``$0.04$``, ``$r^2 = 0.956$`` are checked). So are the
clauses (split at ``;``, ``:``, dashes) and parentheticals about this run: those that say "we",
"our", "here", "this run", "profile", `smoke`/`course`, "digits" or hold inline code, and do not
name the paper. In a sentence that names the paper only to compare ("as in the paper's Fig. 4",
"than the paper's models") only the parts naming the paper are checked.

A markdown table is a quote when its header names the paper (that column is checked against the tag
of its row) or when a quoting sentence introduces it (every column, matched by method, setting and
metric where the labels allow). The source of a number is where the paper prints it: "App. E.2" for
the few-shot recipe, "App. B" for the ResNet-18 loss table, "Fig. 11" for the ResNet-50
projection-head figure (the paper's text calls it Figure 12, a caption it also gives the App. B table).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pandas as pd

from . import paper

__all__ = ["Failure", "check_quote", "files_under", "markdown_cells", "mentions_paper", "scan_cell",
           "scan_file", "scan_paths", "sentences", "tags_of"]


_PAPER_WORDS = re.compile(r"\bpaper\b|\bLi et al\b|\bthe authors\b", re.I)


def mentions_paper(text: str) -> bool:
    """Names the paper in prose ("paper", "Li et al.", "the authors", not inside code) or cites it."""
    return "li2024understanding" in text or bool(_PAPER_WORDS.search(re.sub(r"`[^`]*`", " ", text)))


_SEP = r"\s*(?:,|/|and|&)\s*"
_FIG_ID = r"\d+(?:\s*\(?[a-d]\)?(?!\w))?"
_APP_ID = r"[A-F](?:\.\d+)?(?![\w])"
_TAGS = {
    "Table": rf"\b(?:Tables?|Tab\.)\s*\d+(?!\.\d)(?:{_SEP}\d+(?!\.\d))*",
    "Fig.": rf"\b(?:Figures?|Figs?\.)\s*{_FIG_ID}(?:{_SEP}{_FIG_ID})*",
    "App.": rf"\b(?:Appendix|Appendices|App\.)\s*{_APP_ID}(?:{_SEP}{_APP_ID})*",
}
_TAG = re.compile("|".join(f"(?P<{k[:3].rstrip('.')}>{v})" for k, v in _TAGS.items()))
_MODEL = re.compile(
    r"\b(?:(?:SE)?ResNet[- ]?\d+(?:/\d+)*|DenseNet[- ]?\d+(?:/\d+)*|MobileNet[- ]?[vV]?\d|ConvNet\d"
    r"|Inception[- ]?v\d|ViT[- ]?[BLSH](?:[-/ ]?\d+)?(?![\w-])|R50|R18|CLIP)"
)
_WE = re.compile(
    r"\b(?:we|our|ours|us|here|this run|this chapter|this course|smoke|course|profile|nclab|digits)\b"
    r"|(?<!})`[^`]+`",  # or inline code: our implementation
    re.I,
)
# a sentence that goes on about the source quoted just before it
_CONTINUES = re.compile(
    r"^\W*(?:Its|Their)\b|\b(?:the|its|their) (?:figure|table|panels?|axes|caption)\b", re.I
)
_ABBREV = (
    "Fig",
    "Figs",
    "App",
    "Sec",
    "Eq",
    "eq",
    "e.g",
    "i.e",
    "vs",
    "al",
    "cf",
    "Tab",
    "No",
    "approx",
    "resp",
    "etc",
    "Lvl",
    "Adv",
    "Aug",
    "ca",
)
_PROSE_DIRECTIVES = {
    "exercise",
    "solution",
    "admonition",
    "note",
    "tip",
    "hint",
    "important",
    "warning",
    "caution",
    "attention",
    "seealso",
    "margin",
    "dropdown",
    "prf:remark",
}


def _norm_model(name: str) -> str:
    n = re.sub(r"[^a-z0-9]", "", name.lower())
    return {"r50": "resnet50", "r18": "resnet18"}.get(n, n)


def _expand_models(text: str) -> list[str]:
    """``ResNet-18/50`` -> [resnet18, resnet50]; others normalised one to one."""
    out = []
    for m in _MODEL.finditer(text):
        head = re.match(r"([A-Za-z]+)[- ]?(\d+)((?:/\d+)*)$", m.group(0))
        if head and head.group(3) and not head.group(1).lower().startswith("vit"):
            out += [_norm_model(head.group(1) + n) for n in [head.group(2), *head.group(3).split("/")[1:]]]
        else:
            out.append(_norm_model(m.group(0)))
    return out


def _model_ok(quoted: str, known: list[str]) -> bool:
    return any(quoted == k or k.startswith(quoted) or quoted.startswith(k) for k in known)


def tags_of(text: str) -> list[str]:
    """Source tags named in ``text``, normalised to the table's spelling (``Fig. 10``, ``App. E.2``)."""
    out: list[str] = []
    for m in _TAG.finditer(text):
        prefix = {"Tab": "Table", "Fig": "Fig.", "App": "App."}[m.lastgroup]
        ids = (
            re.sub(r"^\D+?(?=[\dA-F])", "", m.group(0))
            if prefix != "App."
            else re.sub(r"^(?:Appendix|Appendices|App\.)\s*", "", m.group(0))
        )
        for part in re.split(_SEP, ids):
            part = re.sub(r"\s*\(?[a-d]\)?$", "", part.strip())
            tag = f"{prefix} {re.sub(r'[^0-9A-F.]', '', part).rstrip('.')}"
            if tag not in out:
                out.append(tag)
    return out


# ---- markdown -> units ---------------------------------------------------------------------


def _prose(text: str) -> str:
    """Drop code fences (keeping the prose of MyST directives such as exercises), display math,
    HTML comments and directive option lines."""
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.S)
    out, stack = [], []  # stack of (fence, keep)
    for line in text.splitlines():
        m = re.match(r"^\s*(`{3,}|~{3,})\s*(.*)$", line)
        if m:
            fence, info = m.groups()
            if stack and fence[0] == stack[-1][0][0] and len(fence) >= len(stack[-1][0]) and not info:
                stack.pop()
                out.append("")
                continue
            d = re.match(r"\{([\w:-]+)\}", info)
            stack.append((fence, bool(d) and d.group(1) in _PROSE_DIRECTIVES))
            out.append("")
            continue
        if all(keep for _, keep in stack):
            out.append("" if stack and re.match(r"^\s*:[\w-]+:", line) else line)
    return "\n".join(out)


@dataclass
class Unit:
    kind: str  # "heading", "para" or "table"
    text: str
    rows: list[list[str]] = field(default_factory=list)


def _split_cells(line: str) -> list[str]:
    protected, spans = _protect(line)
    cells = protected.strip().strip("|").split("|")
    return [_restore(c, spans).strip() for c in cells]


def units(markdown: str) -> list[Unit]:
    """Headings, paragraphs (list items are paragraphs of their own) and tables of a cell."""
    out: list[Unit] = []
    para: list[str] = []
    table: list[str] = []

    def flush():
        if para:
            out.append(Unit("para", " ".join(s.strip() for s in para)))
            para.clear()
        if table:
            rows = [_split_cells(r) for r in table if not re.fullmatch(r"\s*\|?[\s:|-]+\|?\s*", r)]
            out.append(Unit("table", "\n".join(table), rows))
            table.clear()

    for line in _prose(markdown).splitlines():
        s = line.strip()
        if s.startswith("|"):
            if para:
                flush()
            table.append(s)
            continue
        if table:
            flush()
        if not s:
            flush()
        elif s.startswith("#"):
            flush()
            out.append(Unit("heading", s.lstrip("#").strip()))
        elif re.match(r"^([-*+]|\d+[.)])\s+", s):
            flush()
            para.append(re.sub(r"^([-*+]|\d+[.)])\s+", "", s))
        else:
            para.append(s.lstrip("> "))
    flush()
    return out


# ---- protected spans (code, math, roles) ---------------------------------------------------

_SPAN = re.compile(r"\{\w+\}`[^`]*`|``[^`]+``|`[^`]+`|(?<![\\$])\$[^$]+\$")


def _protect(text: str) -> tuple[str, list[str]]:
    spans: list[str] = []

    def sub(m):
        spans.append(m.group(0))
        return f"\x00{len(spans) - 1}\x00"

    return _SPAN.sub(sub, text), spans


def _restore(text: str, spans: list[str]) -> str:
    return re.sub(r"\x00(\d+)\x00", lambda m: spans[int(m.group(1))], text)


_MATH_VALUE = re.compile(
    r"^\s*(?:[A-Za-z\\^{}_0-9\s]+?=\s*)?(\d+(?:\.\d+)?|(?:\d+(?:\.\d+)?\s*\\times\s*)?10\^\{?-?\d+\}?)"
    r"\s*(\\?%)?\s*$"
)


_MATH_SIZE = re.compile(r"^\s*[NKdDLCHWBEnkq]\s*=")  # $N = 50\,000$, $d = 2048$: sizes, not quoted values


def _plain(text: str, spans: list[str]) -> str:
    """Protected spans replaced for number extraction: a bare value in math stays, the rest goes."""

    def sub(m):
        s = spans[int(m.group(1))]
        if s.startswith("$") and not _MATH_SIZE.match(s.strip("$")):
            v = _MATH_VALUE.match(s.strip("$").replace(r"\,", " "))
            if v:
                val = v.group(1)
                if "10^" in val:  # 10^{-4}, 5 \times 10^{-2}
                    mant = re.match(r"(\d+(?:\.\d+)?)\s*\\times", val)
                    exp = re.search(r"\^\{?(-?\d+)", val).group(1)
                    val = f"{mant.group(1) if mant else '1'}e{exp}"
                return f" {val}{' %' if v.group(2) else ''} "
        return " "

    return re.sub(r"\x00(\d+)\x00", sub, text)


def sentences(para: str) -> list[str]:
    """Split a paragraph into sentences, not at abbreviations (Fig., App., e.g., et al.) nor inside
    code or math."""
    protected, spans = _protect(para)
    out, start = [], 0
    for m in re.finditer(r"[.!?][\"')\]*_]*\s+(?=[A-Z(\[*_\"\x00])", protected):
        word = re.search(r"([\w.]+)[.!?]$", protected[start : m.start() + 1])
        if word and (word.group(1) in _ABBREV or re.fullmatch(r"[A-Za-z]", word.group(1))):
            continue
        out.append(protected[start : m.end()].strip())
        start = m.end()
    out.append(protected[start:].strip())
    return [_restore(s, spans) for s in out if s]


# ---- numbers -------------------------------------------------------------------------------


@dataclass
class Num:
    text: str
    pct: bool = False
    std: str | None = None  # the ``Y`` of ``X ± Y``

    def __str__(self):
        return f"{self.text} ± {self.std}" if self.std else self.text + (" %" if self.pct else "")


_IGNORE = [
    r"\b(?:Blocks?|Layers?|[Ll]evels?|Lvl\.?|Exercises?|Sec\.|Sections?|Chapters?|[Ee]q\.|[Ee]quations?|"
    r"Assignments?|Part|[Ss]teps?|[Ss]eeds?|[Dd]igits?|[Pp]anels?|[Ss]tages?|§)\s*\(?\d+\)?"
    r"(?:\s*(?:,|and|or|to|–|-|/)\s*\d+)*",
    r"\b[A-Za-z][A-Za-z]*-\d+\w*",  # CIFAR-10, VTAB-1k, ImageNet-1k, top-1
    r"\b[A-Za-z]+\d+\w*",  # SUN397, Flowers102, NC1, H200
    r"\d+\s*[×x]\s*\d+(?:\s*[×x]\s*\d+)*",  # 32×32, 3×3
    r"\d+[- ]?(?:px|pixels?)\b",
    r"\d+-\s+(?:and|or|to)\s+(?=\d+-[A-Za-z])",  # "1- and 5-shot"
    r"\d+(?:\.\d+)?-[A-Za-z]+",  # 5-shot, 2-layer, 1-based
    r"(?<![\d.])(?:19[5-9]\d|20[0-3]\d)(?!\d|\.\d|\s*%)",  # years
]


def numbers_in(plain: str) -> list[Num]:
    """Quoted values of a sentence whose code and non-value math are already gone, and whose tags
    and model names are removed."""
    s = plain.replace("−", "-").replace("\u202f", " ").replace("\xa0", " ")
    s = re.sub(r"(\d+(?:\.\d+)?)\s*[×x]\s*10\^?\{?-(\d+)\}?", r"\1e-\2", s)  # 1×10−4
    s = re.sub(r"(\d+)\s*/\s*255\b", r"\1", s)  # eps 8/255
    for pat in _IGNORE:
        s = re.sub(pat, " ", s)
    num = r"\d{1,3}(?: \d{3})+(?![\d.])|\d+(?:\.\d+)?(?:e-?\d+)?"
    out: list[Num] = []
    pos = 0
    pattern = re.compile(
        rf"(?<![\w.,/])(?P<a>{num})(?![\w]|\.\d)"
        rf"(?:\s*±\s*(?P<b>{num}))?"
        rf"(?:\s*(?P<dash>[–-]|to)\s*(?P<c>{num})(?![\w]|\.\d))?"
        rf"(?P<pct>\s*%)?"
    )
    while m := pattern.search(s, pos):
        pos = m.end()
        pct = bool(m.group("pct"))
        if m.group("b"):
            out.append(Num(m.group("a"), pct, m.group("b")))
        else:
            out.append(Num(m.group("a").replace(" ", ""), pct))
        if m.group("c"):
            out.append(Num(m.group("c").replace(" ", ""), pct))
    return out


def _matches(x: str, v: str, metric: str, pct: bool) -> bool:
    """Does the quoted ``x`` print the table's ``v`` (text as the paper prints it) to the precision
    of ``x``? Rounding is half up (92.5 prints as 93). An accuracy may be quoted as a fraction with at
    least three decimals (0.946 for 94.60 %), an r² as a percentage (95.6 %)."""
    xd, vd = Decimal(x), Decimal(v)
    cands = [vd]
    if metric.startswith("acc"):
        if not pct and "." in x and len(x.split(".")[1]) >= 3:
            cands.append(vd / 100)
    elif metric == "r2" and pct:
        cands.append(vd * 100)
    step = Decimal(1).scaleb(xd.as_tuple().exponent)
    sci = "e" in x.lower()  # 5e-4: the exact value
    return any(xd == c if sci else c.quantize(step, rounding=ROUND_HALF_UP) == xd for c in cands)


def _found(n: Num, rows: pd.DataFrame) -> bool:
    for v, sd, metric in zip(rows.value_text, rows.std_text, rows.metric):
        if _matches(n.text, v, metric, n.pct) and (
            n.std is None or (sd != "" and _matches(n.std, sd, "", False))
        ):
            return True
    return False


# ---- quotes --------------------------------------------------------------------------------


@dataclass
class Failure:
    where: str
    sentence: str
    problems: list[str]
    table: str

    def __str__(self):
        return (
            f"{self.where}\n    {self.sentence}\n    -> {'; '.join(self.problems)}\n    table: {self.table}"
        )


def _summary(tags: list[str]) -> str:
    parts = []
    for t in tags:
        rows = paper.cited(t)
        if rows.empty:
            parts.append(f"{t}: not in paper_numbers.csv")
            continue
        vals = [
            f"{m}={v}" if m not in ("min", "max") else f"{m} {v}"
            for m, v in zip(rows.method, rows.value_text)
        ]
        groups: dict[str, list[str]] = {}
        for (src, setting, metric), val in zip(
            rows[["source", "setting", "metric"]].itertuples(index=False), vals
        ):
            groups.setdefault(
                f"{setting}/{metric}" if src == t else f"[{src}] {setting}/{metric}", []
            ).append(val)
        text = "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items())
        parts.append(f"{t}: {text[:600]}{' ...' if len(text) > 600 else ''}")
    return " | ".join(parts)


def _where_found(nums: list[Num]) -> str:
    """Which sources hold each number, the rows printing it exactly first (a hint for the fix)."""
    df = paper.numbers()
    out = []
    for n in nums:
        hits = [r for r in df.itertuples() if _found(n, df.loc[[r.Index]])]
        hits.sort(key=lambda r: (r.value_text != n.text, abs(r.value - float(n.text))))
        names = list(dict.fromkeys(f"{r.source} ({r.setting}/{r.metric})" for r in hits))
        out.append(
            f"{n} is in {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            if names
            else f"{n} is in no source"
        )
    return "; ".join(out)


def _strip_names(plain: str) -> str:
    s = _TAG.sub(" ", plain)
    return _MODEL.sub(" ", s)


_CLAUSE_SEP = r";|:(?!\d)|(?<!\d)\s[—–]\s(?!\d)|—"


def _split_top(text: str) -> list[str]:
    """Split at clause separators outside parentheses."""
    out, depth, start = [], 0, 0
    for m in re.finditer(rf"[()]|{_CLAUSE_SEP}", text):
        tok = m.group(0)
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth = max(depth - 1, 0)
        elif depth == 0:
            out.append(text[start : m.start()])
            start = m.end()
    out.append(text[start:])
    return [p for p in out if p.strip()]


def _parens(text: str) -> tuple[str, list[str]]:
    """The text outside top-level parentheses, and the parentheticals."""
    main, inner, depth, buf = [], [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
            if depth == 1:
                buf = []
                main.append(" ")
                continue
        elif ch == ")" and depth:
            depth -= 1
            if depth == 0:
                inner.append("".join(buf))
                continue
        (buf if depth else main).append(ch)
    if depth:
        inner.append("".join(buf))
    return "".join(main), inner


def _names_paper(text: str) -> bool:
    return mentions_paper(text) or bool(tags_of(text))


def _about_us(text: str) -> bool:
    return bool(_WE.search(text)) and not _names_paper(text)


def _comparative(sentence: str) -> bool:
    """Every mention of the paper is a comparison ("as in the paper's Fig. 4", "than the paper's")."""
    hits = list(_PAPER_WORDS.finditer(re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), sentence)))
    return bool(hits) and all(
        re.search(r"\b(?:as|like|unlike|than)\s+(?:in\s+)?(?:the\s+)?$", sentence[: m.start()]) for m in hits
    )


def _pieces(sentence: str, only_named: bool = False) -> list[str]:
    """The parts of a sentence whose numbers are checked: its clauses (split at ``;``, ``:`` and
    dashes) and their parentheticals, less those about this run. With ``only_named`` (a sentence
    that gives no source, or names the paper only to compare with it) only the parts that name the
    paper or a source, and the parentheticals of such parts."""
    protected, spans = _protect(sentence)
    out = []
    for clause in _split_top(protected):
        main, inner = _parens(clause)
        main_text = _restore(main, spans)
        parent_us, parent_named = _about_us(main_text), _names_paper(main_text)
        groups = [(main, False, False)]
        for p in inner:
            p_us = parent_us or _about_us(_restore(p, spans))
            groups += [(q, p_us, parent_named) for q in _split_top(p)]
        for piece, inherited_us, inherited_named in groups:
            text = _restore(piece, spans)
            named = _names_paper(text)
            if only_named and not (named or inherited_named):
                continue
            if not named and (inherited_us or _about_us(text)):
                continue
            out.append(piece)
    return [_restore(p, spans) for p in out]


def check_quote(
    sentence: str, tags: list[str], extra_tags: Sequence[str] = (), rows: pd.DataFrame | None = None
) -> list[str]:
    """Problems of one quoting sentence (empty when it agrees with the table). ``tags`` are the
    sentence's own tags, ``extra_tags`` those of the heading above; ``rows`` overrides the rows the
    numbers are matched against (used for table cells)."""
    all_tags = list(dict.fromkeys([*tags, *extra_tags]))
    problems = []
    checked: list[Num] = []
    models: list[str] = []
    for piece in _pieces(sentence, only_named=not all_tags or _comparative(sentence)):
        protected, spans = _protect(piece)
        plain = _plain(protected, spans)
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", plain).replace("**", "").replace("*", "")
        models += _expand_models(plain)
        checked += numbers_in(_strip_names(plain))
    if not all_tags:
        if checked:
            problems.append(
                f"names the paper and quotes {', '.join(map(str, checked))} but no source; "
                + _where_found(checked)
            )
        return problems
    unknown = [t for t in tags if paper.cited(t).empty]
    if unknown and checked:
        problems.append(f"source {', '.join(unknown)} is not in paper_numbers.csv")
    if rows is None:
        known = [paper.cited(t) for t in all_tags if not paper.cited(t).empty]
        rows = pd.concat(known) if known else paper.numbers().iloc[:0]
    bad = [str(n) for n in checked if not _found(n, rows)]
    if bad and not (unknown and rows.empty):
        where = ", ".join(all_tags)
        if not tags:
            where += f" (the sentence names no source; {where} is the section heading's)"
        problems.append(f"{', '.join(bad)} not found in {where}")
    known_models = [_norm_model(m) for t in all_tags for m in paper.models(t)]
    if known_models:
        wrong = [m for m in dict.fromkeys(models) if not _model_ok(m, known_models)]
        if wrong:
            problems.append(
                f"{', '.join(wrong)} not a backbone of {', '.join(all_tags)} "
                f"(it uses {', '.join(dict.fromkeys(known_models))})"
            )
    return problems


_METRIC_WORDS = [("nc1", "nc1"), ("param", "params_pct"), ("accuracy", "acc"), ("acc", "acc")]


def _tokens(s: str) -> set[str]:
    return {t for t in re.split(r"[^a-z0-9]+", s.lower().replace("cifar-", "cifar")) if t}


def _cell_rows(tags: list[str], header0: str, column: str, label: str) -> pd.DataFrame:
    """The rows a table cell can quote: the tagged sources, narrowed by the metric of the table's
    first header cell, the method of the row label and the setting of the column where they match."""
    known = [paper.cited(t) for t in tags if not paper.cited(t).empty]
    if not known:
        return paper.numbers().iloc[:0]
    rows = pd.concat(known)
    for word, metric in _METRIC_WORDS:
        if word in header0.lower() and (rows.metric == metric).any():
            rows = rows[rows.metric == metric]
            break
    lab = _tokens(label)
    by_method = rows[[bool(_tokens(m)) and _tokens(m) <= lab for m in rows.method]]
    if not by_method.empty:
        rows = by_method
    col = _tokens(column)
    by_setting = rows[[bool(col) and (col <= _tokens(s) or _tokens(s) <= col) for s in rows.setting]]
    k = re.search(r"\bK\s*=\s*(\d+)", column)
    if by_setting.empty and k:  # "R50, K=47": the settings of the source with 47 classes
        src = pd.concat([paper.cited(t) for t in tags])
        first = column.split(",")[0].strip().lower()
        names = set(src[(src.metric == "classes") & (src.value_text == k.group(1))].setting)
        by_setting = rows[[s in names and s.lower().startswith(first) for s in rows.setting]]
    return by_setting if not by_setting.empty else rows


def scan_cell(markdown: str, where: str, heading_tags: list[str] | None = None) -> list[Failure]:
    """All failing paper quotes of one markdown cell. ``heading_tags`` carries the tags of the last
    heading across cells (the list is updated in place)."""
    heading_tags = heading_tags if heading_tags is not None else []
    failures: list[Failure] = []
    intro: list[str] | None = None  # tags of a quoting sentence that introduces the next table
    for unit in units(markdown):
        if unit.kind == "heading":
            heading_tags[:] = tags_of(unit.text)
            intro = None
            continue
        if unit.kind == "para":
            intro, prev = None, None
            for s in sentences(unit.text):
                own = tags_of(s)
                cont = prev if prev and _CONTINUES.search(s) else None  # "Its axes span ..."
                if not (mentions_paper(s) or cont):
                    prev = None
                    continue
                tags = own or cont or []
                problems = check_quote(s, tags, heading_tags)
                if problems:
                    failures.append(
                        Failure(where, s, problems, _summary(list(dict.fromkeys(tags + heading_tags))))
                    )
                prev = intro = tags or heading_tags or None
            continue
        # a table
        header, body = unit.rows[0], unit.rows[1:]
        paper_cols = [i for i, h in enumerate(header) if mentions_paper(h)]
        if not paper_cols and not intro:
            continue
        for row in body:
            row_tags = tags_of(" ".join(row)) or (intro or heading_tags)
            cols = paper_cols or range(1, len(row))
            for i in cols:
                if i >= len(row) or not re.search(r"\d", row[i]):
                    continue
                rows = _cell_rows(row_tags, header[0], header[i] if i < len(header) else "", row[0])
                cell = f"{row[0]} | {header[i] if i < len(header) else ''}: {row[i]}"
                problems = check_quote(row[i], tags_of(" ".join(row)) or row_tags, rows=rows)
                if problems:
                    failures.append(Failure(where, cell, problems, _summary(row_tags)))
    return failures


_SKIP_DIRS = {"_build", ".ipynb_checkpoints", ".venv", "node_modules", ".git"}


def files_under(paths: Sequence[str | Path]) -> list[Path]:
    """The notebooks and ``.md`` pages given, or found under the folders given (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [f for f in p.rglob("*") if f.suffix in (".ipynb", ".md") and f.is_file()
                     and not _SKIP_DIRS.intersection(f.relative_to(p).parts)]
            out += sorted(found)
        elif p.is_file():
            if p.suffix not in (".ipynb", ".md"):
                raise ValueError(f"{p}: not a notebook (.ipynb) or a markdown page (.md)")
            out.append(p)
        else:
            raise ValueError(f"{p} does not exist")
    return list(dict.fromkeys(out))


def markdown_cells(path: str | Path) -> list[tuple[int | None, str]]:
    """(cell index, markdown) of a notebook's markdown cells; ``[(None, text)]`` for a ``.md`` page."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        return [(None, text)]
    out = []
    for i, cell in enumerate(json.loads(text)["cells"]):
        if cell["cell_type"] == "markdown":
            src = cell["source"]
            out.append((i, src if isinstance(src, str) else "".join(src)))
    return out


def scan_file(path: str | Path, name: str | None = None) -> list[Failure]:
    """Every disagreeing quote in one notebook or page; a heading's source tags carry over to the
    cells below it."""
    name = name or str(path)
    heading: list[str] = []
    failures: list[Failure] = []
    for idx, text in markdown_cells(path):
        where = name + (f", cell {idx}" if idx is not None else "")
        failures += scan_cell(text, where, heading)
    return failures


def scan_paths(
    paths: Sequence[str | Path], root: str | Path | None = None
) -> tuple[list[Path], list[Failure]]:
    """Scan the notebooks and pages under ``paths`` (see :func:`files_under`).

    Returns the files read and the failures; locations are given relative to ``root`` when the file
    lies under it."""
    files = files_under(paths)
    failures: list[Failure] = []
    for f in files:
        name = str(f)
        if root is not None:
            try:
                name = str(f.resolve().relative_to(Path(root).resolve()))
            except ValueError:
                pass
        failures += scan_file(f, name)
    return files, failures
