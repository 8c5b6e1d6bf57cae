"""The paper's numbers (``nclab.paper``), the quote scanner (``nclab.quotes``) and the course's own
check: every quote of the paper in the book agrees with ``nclab/resources/paper_numbers.csv``.

The quoting convention for chapter authors and what the scanner checks are in ``nclab.quotes``;
``nclab check-quotes book/`` runs the same check from the command line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nclab import cli, paper
from nclab.quotes import Failure, scan_cell, scan_paths, sentences, tags_of

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


# --------------------------------------------------------------------------------------------
# nclab.paper
# --------------------------------------------------------------------------------------------


def test_table_shape_and_keys():
    df = paper.numbers()
    assert list(df.columns[:6]) == ["source", "setting", "metric", "method", "value", "std"]
    assert not df.duplicated(["source", "setting", "metric", "method"]).any()
    assert df.value.notna().all()
    for s in ["Table 2", "Table 3", "Table 4", "Table 5", "App. B", "Fig. 1", "Fig. 2", "Fig. 3", "Fig. 10"]:
        assert s in paper.sources()
    # 5 methods x 8 settings x 3 metrics of Table 3, 2 x 17 tasks + average of Table 5
    t3 = df[(df.source == "Table 3") & df.metric.isin(["acc", "nc1", "params_pct"])]
    assert len(t3) == 120
    assert len(df[(df.source == "Table 5") & (df.metric == "acc")]) == 36


@pytest.mark.parametrize(
    "key, expected",
    [
        (("Table 3", "R50 CIFAR-10", "acc", "Layer FT"), 94.60),
        (("Table 3", "R50 Pet", "acc", "Full FT"), 86.25),
        (("Table 3", "ViT Pet", "nc1", "MLP probe"), 0.66),
        (("Table 3", "R50 CIFAR-100", "params_pct", "SCL FT"), 7.24),
        (("Table 2", "miniImageNet 5-shot", "acc", "SEResNet12"), 77.17),
        (("Table 2", "CIFAR-FS", "nc1", "ConvNet4"), 38.12),
        (("Table 4", "ViT", "lr", "Full FT"), 1e-3),
        (("Table 5", "dSpr-Ori", "acc", "Layer LoRA"), 31.7),
        (("App. B", "ResNet18 CIFAR-100 to CIFAR-10", "acc", "SupCon, 2-layer MLP projection"), 79.51),
        (("Fig. 3", "ResNet34 CIFAR-10", "r2", ""), 0.956),
        (("Fig. 10", "ResNet50 CIFAR-100 to CIFAR-10", "turning_point_source_nc1", ""), 1.0),
        (("Fig. 10", "ResNet50 CIFAR-100 to CIFAR-10", "acc_axis", "max"), 78),
        (("Fig. 8", "CLIP CIFAR-100", "images_per_class", "subset 4"), 87),
        (("App. E.2", "Table 2 CIFAR-FS", "epochs", ""), 90),
    ],
)
def test_value(key, expected):
    assert paper.value(*key) == pytest.approx(expected)


def _printed(source: str, setting: str, metric: str, method: str) -> str:
    row = paper.numbers().query(
        "source == @source and setting == @setting and metric == @metric and method == @method"
    )
    assert len(row) == 1, (source, setting, metric, method)
    v, sd = row.value_text.item(), row.std_text.item()
    return f"{v}±{sd}" if sd else v


_T3_SETTINGS = ["R50 CIFAR-10", "R50 CIFAR-100", "R50 Aircraft", "R50 DTD", "R50 Pet",
                "ViT Aircraft", "ViT DTD", "ViT Pet"]
# rows of the paper's Table 3 and App. B table as printed (checked once against the paper text)
_T3_ROWS = {
    ("acc", "SCL FT"): "95.08±0.14 79.04±0.19 72.57±0.14 73.51±0.04 92.07±0.02 73.17±0.37 "
                       "77.80±0.17 93.46±0.05",
    ("nc1", "Full FT"): "0.04±0.00 0.06±0.01 0.25±0.02 0.25±0.02 0.12±0.00 3.33±0.21 0.97±0.05 "
                        "0.14±0.00",
    ("params_pct", "Layer FT"): "6.52 7.24 7.24 6.82 6.73 8.18 8.14 8.13",
}
_APP_B = {"MSE, no projection": ("0.001", "53.96"), "Cross-entropy, no projection": ("0.771", "71.2"),
          "SupCon, linear projection": ("0.792", "69.89"),
          "SupCon, 2-layer MLP projection": ("2.991", "79.51")}


def test_values_keep_the_printed_precision():
    for (metric, method), cells in _T3_ROWS.items():
        for setting, cell in zip(_T3_SETTINGS, cells.split(), strict=True):
            assert _printed("Table 3", setting, metric, method) == cell
    for method, (nc1, acc) in _APP_B.items():
        assert _printed("App. B", "ResNet18 CIFAR-100 to CIFAR-10", "source_nc1", method) == nc1
        assert _printed("App. B", "ResNet18 CIFAR-100 to CIFAR-10", "acc", method) == acc


def test_std_and_quote():
    assert paper.std("Table 3", "R50 CIFAR-10", "acc", "Layer FT") == pytest.approx(0.11)
    assert math.isnan(paper.std("Table 5", "SVHN", "acc", "Layer FT"))
    assert paper.quote("Table 3", "R50 CIFAR-10", "acc", "Layer FT") == "94.60 ± 0.11"
    assert paper.quote("Table 3", "R50 CIFAR-10", "acc", "Layer FT", unit="%") == "94.60 ± 0.11 %"
    assert paper.quote("Table 3", "R50 CIFAR-10", "nc1", "Full FT") == "0.04 ± 0.00"
    assert paper.quote("Table 5", "Flowers102", "acc", "Layer LoRA") == "100.0"
    assert (
        paper.quote("App. B", "ResNet18 CIFAR-100 to CIFAR-10", "source_nc1", "MSE, no projection") == "0.001"
    )
    assert paper.quote("Table 4", "ResNet", "weight_decay", "MLP probe") == "5e-4"


def test_unknown_key_lists_close_matches():
    with pytest.raises(KeyError, match="R50 CIFAR-10 \\| acc \\| Layer FT"):
        paper.value("Table 3", "R50 CIFAR10", "acc", "Layer FT")
    with pytest.raises(KeyError, match="no paper number"):
        paper.quote("Table 9", "x", "y", "z")


def test_models_and_cited():
    assert paper.models("Fig. 10") == ["ResNet50"]
    assert "MobileNetV2" in paper.models("Fig. 2") and len(paper.models("Fig. 2")) == 7
    assert paper.models("Table 5") == []
    t2 = paper.cited("Table 2")
    assert {"Table 2", "App. E.2"} == set(t2.source)  # the protocol rows of App. E.2 come along
    assert set(paper.cited("App. E").source) == {"App. E", "App. E.1", "App. E.2"}
    assert "Fig. 11" not in set(paper.cited("Fig. 1").source)


def test_numbers_is_a_copy():
    df = paper.numbers()
    df.loc[:, "value"] = 0.0
    assert paper.value("Table 3", "R50 CIFAR-10", "acc", "Layer FT") == pytest.approx(94.60)


# --------------------------------------------------------------------------------------------
# The scanner


# --------------------------------------------------------------------------------------------
# The scanner (nclab.quotes)
# --------------------------------------------------------------------------------------------


def _fails(text: str) -> list[Failure]:
    return scan_cell(text, "synthetic")


def test_scanner_accepts_correct_quotes():
    ok = [
        "The paper reports 94.60 ± 0.11 % for Layer FT on CIFAR-10 (Table 3).",
        "In the paper's Table 3, full fine-tuning reaches 95.25 %, and only 86.25 % on Pets.",
        "The paper (Fig. 2) finds NC1 between about 0.8 and 1.3 and accuracies between 87.5 % and 91 %.",
        "The paper reports $r^2 = 0.956$ for ResNet-34 and 0.946 for ViT-B (Fig. 3).",
        "The paper's Fig. 10 (ResNet-50 on CIFAR-100) puts the turning point near a source NC1 of 1.0, "
        "on axes spanning 0.2–1.8 and 66–78 %.",
        "App. B of the paper gives 79.51 % against 69.89 % for SupCon with an MLP head.",
        "The paper trains for 90 epochs on CIFAR-FS (Table 2) with a batch of 64.",
        "In the paper's Table 3 the tuned unit is Block 8 of ResNet-50 at 224 px, a 0.9460 share.",
        "The paper (Table 3) trains 6.5–7.2 % of ResNet-50's parameters; ours trains 30 %.",
        "The paper (Table 2) uses 5-way 1- and 5-shot episodes: 68.61 % for ResNet12 in 2020.",
    ]
    for s in ok:
        assert _fails(s) == [], s


def test_scanner_flags_wrong_numbers_sources_and_models():
    cases = {
        "The paper reports 94.70 % for Layer FT on CIFAR-10 (Table 3).": "94.70",
        "The paper reports 94.60 ± 0.12 (Table 3).": "0.12",
        # a Fig. 2 range attributed to Fig. 10
        "The paper's Fig. 10 shows source NC1 between 0.8 and 1.3.": "0.8",
        # the right number, the wrong figure
        "The paper reports r² = 0.956 in Fig. 2.": "0.956",
        "The paper's Fig. 10 (ResNet-18 and ResNet-50) turns at 1.0.": "resnet18",
        "The paper's Fig. 12 reports 79.51 %.": "Fig. 12",
        "The paper reports 92.5 % (Table 3).": "92.5",
        # the wrong quote chapter 03 had: Fig. 10 described with the models and ranges of Fig. 2
        "The paper's Fig. 10 (ResNet-18 and ResNet-50 on CIFAR-100, transfer to CIFAR-10) finds a positive "
        "relation, with source NC1 between about 0.8 and 1.3 and CIFAR-10 accuracy between about 87.5 % and "
        "91 %, but only up to a threshold: past a source NC1 of about 1.0 the gain stops.": (
            "0.8, 1.3, 87.5 %, 91 % not found in Fig. 10; resnet18 not a backbone"
        ),
    }
    for s, expected in cases.items():
        f = _fails(s)
        assert len(f) == 1 and expected in "; ".join(f[0].problems), (s, f)


def test_scanner_ignores_non_quotes():
    ignored = [
        "Our ConvNet reaches 97.3 % after 8 epochs (compare Table 3).",  # no paper mention
        "The paper's claim is about pre-training; our probe reaches 0.75–0.99 here.",  # no source
        "Table 3 reports 12.34 % in our run.",
        "The paper (Table 3) is clear; here we measure 12.34 % on digits.",  # a clause about us
        "The paper (Table 3) uses `lr=0.123` and $\\eta_0 = 0.1 \\cdot 3.7$ {cite}`li2024understanding`.",
        "The paper's CIFAR-100 features ($N = 50\\,000$, $d = 2048$, $K = 100$) are large (Table 3).",
    ]
    for s in ignored:
        assert _fails(s) == [], s


def test_scanner_tables():
    good = (
        "| quantity | paper {cite}`li2024understanding` | this run |\n|---|---|---|\n"
        "| Fig. 2: NC1 range | ≈ 0.8 – 1.3 | 12.5 |\n| Fig. 3: $r^2$, ResNet-34 | 0.956 | 0.7 |\n"
    )
    assert _fails(good) == []
    bad = good.replace("0.956", "0.965")
    assert "0.965" in str(_fails(bad))
    intro = (
        "The paper's Table 3 (means over 3 seeds):\n\n| transfer accuracy (%) | R50 CIFAR-10 | R50 Pet |\n"
        "|---|---|---|\n| Layer FT | 94.60±0.11 | 91.95±0.10 |\n"
    )
    assert _fails(intro) == []
    # a value of another cell of Table 3 in the wrong place
    swapped = intro.replace("91.95±0.10", "94.60±0.11")
    assert "94.60" in str(_fails(swapped))


def test_scanner_heading_context_and_exercise_prose():
    text = "## Fig. 8: scarce data\n\nThe paper uses 3, 10, 32, 100 and 316 images per class (3 seeds).\n"
    assert _fails(text) == []
    assert _fails(text.replace("316", "320"))
    fenced = (
        "```{exercise}\n:label: x\n\nThe paper's Table 3 reports 99.99 %.\n```\n"
        "```python\npaper = 'Table 3 1.23'\n```"
    )
    f = _fails(fenced)
    assert len(f) == 1 and "99.99" in f[0].problems[0]


def test_scanner_continuations_comparisons_and_unsourced_quotes():
    # "Its ..." continues the quote of the sentence before
    assert _fails("The paper's Fig. 1 shows a negative relation. Its NC1 axis spans 2 to 5.") == []
    assert "2.5" in str(_fails("The paper's Fig. 1 shows a negative relation. Its NC1 axis spans 2.5 to 5."))
    assert "81" in str(_fails("The paper's Fig. 11 varies the head. In every panel the axes span 81–85 %."))
    # numbers of a sentence that only compares with the paper are ours
    assert (
        _fails(
            "Across tasks NC1 falls, as in the paper's Fig. 4, with a caveat: the tasks have 2 to 10 classes."
        )
        == []
    )
    # a parenthetical about this run inside a quote
    assert _fails("The paper's Table 3 shows it (our ConvNet: 12.4 k parameters).") == []
    assert "12.4" in str(_fails("The paper's Table 3 shows it (ConvNet: 12.4 k parameters)."))
    # ... but not a number of ours in a clause that does not name the paper
    assert (
        _fails("With ~10 images per class the gap is noise; the paper's margins come from big models.") == []
    )
    # a paper number without a source fails, with a hint where the table has it
    f = _fails("The paper trains for 90 epochs on CIFAR-FS.")
    assert len(f) == 1 and "no source" in f[0].problems[0] and "App. E.2" in f[0].problems[0]
    # the word inside code is not the paper
    assert _fails("The `paper` profile of Table 3 runs 5 methods x 9 datasets.") == []


def test_sentence_splitting():
    assert sentences("The ratio lies on both sides of 1. These facts fit.") == [
        "The ratio lies on both sides of 1.",
        "These facts fit.",
    ]
    s = sentences("See Fig. 3 of the paper, e.g. ResNet-34. Then App. B gives 0.771. The end $a. B$ here.")
    assert s == [
        "See Fig. 3 of the paper, e.g. ResNet-34.",
        "Then App. B gives 0.771.",
        "The end $a. B$ here.",
    ]
    assert tags_of("Figs. 7 and 14, Table 3, App. E.2, Figure 9(b) and Fig. 3 (a)") == [
        "Fig. 7",
        "Fig. 14",
        "Table 3",
        "App. E.2",
        "Fig. 9",
        "Fig. 3",
    ]


def test_check_quotes_command(tmp_path, capsys):
    good = tmp_path / "good.md"
    good.write_text("The paper reports 94.60 ± 0.11 % for Layer FT on CIFAR-10 (Table 3).\n")
    bad = tmp_path / "bad.ipynb"
    cell = {"cell_type": "markdown", "metadata": {}, "source": ["The paper reports 94.70 % (Table 3)."]}
    bad.write_text(json.dumps({"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert cli.main(["check-quotes", str(good)]) == 0
    assert "every paper quote agrees" in capsys.readouterr().out
    assert cli.main(["check-quotes", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "2 file(s) read: 1 paper quote(s) disagree" in out.out and "bad.ipynb, cell 0" in out.err
    assert "94.70" in out.err
    assert cli.main(["check-quotes", str(tmp_path / "missing.md")]) == 2


def test_course_quotes_agree_with_the_paper():
    files, failures = scan_paths([BOOK], root=ROOT)
    assert any(f.suffix == ".ipynb" for f in files) and any(f.suffix == ".md" for f in files)
    assert not failures, f"{len(failures)} paper quotes disagree with paper_numbers.csv:\n\n" + "\n\n".join(
        map(str, failures)
    )
