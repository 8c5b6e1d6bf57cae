"""nclab.grading: correct code gets full marks, subtly wrong code loses points with a useful message,
stubs score zero with "not implemented yet"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nclab import grading as G


# Independent float64 references written here (not nclab.metrics).
def _mu(h, y, k):
    return torch.stack([h[y == c].mean(0) for c in range(k)])


def sigma_w(h, y, k):
    h = torch.as_tensor(h).double()
    c = h - _mu(h, y, k)[y]
    return c.T @ c / len(y)


def sigma_b(h, y, k):
    h = torch.as_tensor(h).double()
    m = _mu(h, y, k)
    c = m - m.mean(0)
    return c.T @ c / k


def nc1(h, y, k):
    return torch.trace(sigma_w(h, y, k) @ torch.linalg.pinv(sigma_b(h, y, k))) / k


def cdnv(h, y, k):
    h = torch.as_tensor(h).double()
    m = _mu(h, y, k)
    var = torch.stack([((h[y == c] - m[c]) ** 2).sum(1).mean() for c in range(k)])
    pairs = [(var[i] + var[j]) / (2 * ((m[i] - m[j]) ** 2).sum())
             for i in range(k) for j in range(k) if i != j]
    return float(torch.stack(pairs).mean())


def sigma_w_unbiased(h, y, k):
    return sigma_w(h, y, k) * len(y) / (len(y) - 1)


def sigma_b_sample_mu_g(h, y, k):
    h = torch.as_tensor(h).double()
    c = _mu(h, y, k) - h.mean(0)
    return c.T @ c / k


def stub(*args, **kwargs):
    raise NotImplementedError("HINT: average the outer products")


@pytest.mark.parametrize("check, fn", [(G.check_sigma_w, sigma_w), (G.check_sigma_b, sigma_b),
                                        (G.check_nc1, nc1), (G.check_cdnv, cdnv)])
def test_correct_functions_get_full_marks(check, fn):
    score = check(fn)
    assert score.full_marks, score
    assert score.points == score.max_points == 2.0
    # numpy outputs are accepted too
    assert check(lambda h, y, k: torch.as_tensor(fn(h, y, k)).numpy()).full_marks


def test_other_seeds_are_other_cases():
    a = [name for name, _ in G.feature_cases(0)]
    b = [name for name, _ in G.feature_cases(1)]
    assert a != b
    h0 = G.feature_cases(0)[1][1][0]
    assert torch.equal(h0, G.feature_cases(0)[1][1][0])  # reproducible
    assert any(args[0].shape[1] > args[0].shape[0] for _, args in G.feature_cases(3))  # d > N
    assert G.check_nc1(nc1, seed=5).full_marks


def test_n_minus_1_loses_points_with_message():
    score = G.check_sigma_w(sigma_w_unbiased)
    assert score.points == 0
    assert all("N - 1" in r.message for r in score.results), score
    score = G.check_nc1(lambda h, y, k: nc1(h, y, k) * len(y) / (len(y) - 1))
    assert score.points == 0 and "N - 1" in str(score)


def test_sample_weighted_global_mean_loses_points_on_imbalanced_cases():
    score = G.check_sigma_b(sigma_b_sample_mu_g)
    assert 0 < score.points < score.max_points, score
    failed = [r for r in score.results if r.status == "fail"]
    assert any("imbalanced" in r.case for r in failed)
    assert all("mean of the class means" in r.message for r in failed)


def test_wrong_shape_exception_and_stub_feedback():
    s = G.check_sigma_w(lambda h, y, k: sigma_w(h, y, k)[0])
    assert s.points == 0 and "expected shape" in s.results[0].message
    s = G.check_cdnv(lambda h, y, k: 1 / 0)
    assert s.points == 0 and "ZeroDivisionError" in s.results[0].message
    s = G.check_nc1(stub)
    assert s.points == 0
    assert all(r.status == "not implemented" for r in s.results)
    assert "not implemented yet" in s.results[0].message and "outer products" in s.details()
    s = G.check_nc1(lambda h, y, k: float("nan"))
    assert "non-finite" in s.results[0].message


def test_score_adds_renders_and_selects_parts():
    total = G.Score.total("A1", G.check_sigma_w(sigma_w), G.check_nc1(stub))
    assert total.points == 2 and total.max_points == 4 and not total.full_marks
    assert total.parts == {"sigma_w": (2.0, 2.0), "nc1": (0.0, 2.0)}
    assert total.part("nc1").points == 0
    with pytest.raises(ValueError, match="parts"):
        total.part("cdnv")
    text = str(total)
    assert text.startswith("A1: 2 / 4 points")
    html = total._repr_html_()
    assert "<table>" in html and "not implemented yet" in html
    assert html.count("<tr>") == 1 + 2  # header + one row per check, not one per case
    assert (G.check_sigma_w(sigma_w) + G.check_nc1(nc1)).full_marks


def test_choose_layer():
    assert G.check_choose_layer(lambda d: min(d, key=d.get)).full_marks
    s = G.check_choose_layer(lambda d: max(d, key=d.get))
    assert s.points <= 0.2 and "expected" in s.results[0].message  # only the 1-layer case
    # last-on-tie loses the tie case only
    s = G.check_choose_layer(lambda d: min(reversed(list(d)), key=d.get))
    assert 0 < s.points < s.max_points and [r.case for r in s.results if r.status == "fail"][0]


# ------------------------------------------------------------------ SCL model properties
class _SCL(nn.Module):
    def __init__(self, backbone, block, num_classes, skip=True, pad_front=False, freeze=True):
        super().__init__()
        self.backbone, self.skip, self.pad_front = backbone, skip, pad_front
        self.block = backbone.get_submodule(block)
        self.head = nn.Linear(backbone.num_features, num_classes)
        if freeze:
            backbone.requires_grad_(False)
            self.block.requires_grad_(True)
        self._out = None
        self.block.register_forward_hook(lambda m, i, o: setattr(self, "_out", o))

    def features(self, x):
        pen = self.backbone(x)
        if not self.skip:
            return pen
        v = self._out.mean((2, 3))
        gap = pen.shape[1] - v.shape[1]
        return pen + F.pad(v, (gap, 0) if self.pad_front else (0, gap))

    def forward(self, x):
        return self.head(self.features(x))


def test_scl_model_properties():
    assert G.check_scl_model(lambda b, n, k, skip=True: _SCL(b, n, k, skip)).full_marks
    layer = G.check_scl_model(lambda b, n, k, skip=True: _SCL(b, n, k, skip), skip=False)
    assert layer.full_marks, layer
    no_skip = G.check_scl_model(lambda b, n, k, skip=True: _SCL(b, n, k, False))
    fails = [r for r in no_skip.results if r.status == "fail"]
    assert len(fails) == 3 and all("add the skip" in r.message for r in fails)
    front = G.check_scl_model(lambda b, n, k, skip=True: _SCL(b, n, k, pad_front=True))
    assert any("padded at the end" in r.message for r in front.results), front
    unfrozen = G.check_scl_model(lambda b, n, k, skip=True: _SCL(b, n, k, freeze=False))
    assert [r.status for r in unfrozen.results if "trainable" in r.case] == ["fail"] * 3
    assert "should be frozen" in str(unfrozen)
    stubbed = G.check_scl_model(stub)
    assert stubbed.points == 0 and all(r.status == "not implemented" for r in stubbed.results)


# ------------------------------------------------------------------ where to probe
def _layerwise_nc1(model, data, layers):
    from nclab import features, metrics

    stats = features.extract(model, data, layers, progress=False)
    return {name: metrics.nc1(stats[name]) for name in layers}


def _probe_accuracy(model, train, test, layer):
    from nclab import features, probe

    f_tr, y_tr = features.extract(model, train, [layer], return_features=True, progress=False)
    f_te, y_te = features.extract(model, test, [layer], return_features=True, progress=False)
    return probe.linear_probe(f_tr[layer], y_tr, f_te[layer], y_te).test_acc


def test_layerwise_nc1_and_probe_checks():
    assert G.check_layerwise_nc1(_layerwise_nc1).full_marks
    # every layer given the output's NC1: wrong values, named in the feedback
    wrong = G.check_layerwise_nc1(
        lambda m, d, layers: dict.fromkeys(layers, _layerwise_nc1(m, d, ["output"])["output"]))
    assert wrong.points == 0 and "NC1 of layer" in wrong.results[0].message
    missing = G.check_layerwise_nc1(lambda m, d, layers: _layerwise_nc1(m, d, layers[:-1]))
    assert missing.points == 0 and "missing ['output']" in missing.results[0].message
    assert G.check_probe_accuracy(_probe_accuracy).full_marks
    pct = G.check_probe_accuracy(lambda *a: 100 * _probe_accuracy(*a))
    assert pct.points == 0 and "percentage" in pct.results[0].message
    assert G.check_probe_accuracy(stub).points == 0


def test_score_shows_one_line_per_check():
    wrong = G.Score.total("A1", G.check_sigma_w(sigma_w), G.check_nc1(stub),
                          G.check_cdnv(lambda h, y, k: 1.0))
    lines = str(wrong).splitlines()
    assert lines[0] == "A1: 2 / 6 points" and len(lines) == 4
    assert lines[1].split()[:5] == ["✔", "sigma_w", "2", "/", "2"]
    assert lines[2].split()[:5] == ["…", "nc1", "0", "/", "2"] and "not implemented yet" in lines[2]
    assert "outer products" not in str(wrong)  # the stub's hint is in the notebook, not repeated
    n = len(wrong.part("cdnv").results)
    assert f"{n} of {n} cases fail" in lines[3] and "expected" in lines[3]
    details = wrong.details()
    assert details.count("✘") == n and details.count("outer products") == 1
    html = wrong._repr_html_()
    assert html.count("<tr>") == 4 and html.count("<li>") == n and "<details>" in html
    assert "<details>" not in G.check_sigma_w(sigma_w)._repr_html_()


def test_attempt_summarises_a_stub_in_one_line(capsys):
    def sigma_b(h, y, k):
        raise NotImplementedError("average the outer products")

    ran = []
    with G.attempt():
        sigma_b(None, None, 3)
        ran.append("after")  # skipped
    out = capsys.readouterr().out
    assert ran == [] and out.count("\n") == 1
    assert out.startswith("… sigma_b: not implemented yet") and "outer products" not in out
    with G.attempt("Task 2"):
        sigma_b(None, None, 3)
    assert capsys.readouterr().out.startswith("… Task 2: not implemented yet")
    with pytest.raises(ZeroDivisionError):  # a bug in written code keeps its traceback
        with G.attempt():
            _ = 1 / 0
    with G.attempt():
        ran.append("ok")
    assert ran == ["ok"] and capsys.readouterr().out == ""
