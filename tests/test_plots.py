"""nclab.plots.class_mean_plane and feature_projection: shapes, a float64 NumPy known answer."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import nclab  # noqa: E402
from nclab import plots  # noqa: E402


def _numpy_plane(h: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the centred class means by eigendecomposition of their covariance, float64."""
    mu = np.stack([h[y == c].mean(0) for c in np.unique(y)])
    center = mu.mean(0)
    m = mu - center
    evals, evecs = np.linalg.eigh(m.T @ m / len(m))
    return center, evecs[:, np.argsort(evals)[::-1][:2]]


def test_plane_matches_numpy_pca_up_to_sign():
    h, y = nclab.data.synthetic_features(num_classes=5, per_class=20, dim=12, seed=3)
    h = h + torch.linspace(-2, 2, 12, dtype=torch.float64)  # an offset the centring must remove
    center, v = plots.class_mean_plane(h.float(), y)  # float32 in, float64 out
    ref_center, ref_v = _numpy_plane(h.numpy(), y.numpy())
    assert center.dtype == v.dtype == np.float64
    assert center.shape == (12,) and v.shape == (12, 2)
    np.testing.assert_allclose(center, ref_center, atol=1e-6)
    np.testing.assert_allclose(v.T @ v, np.eye(2), atol=1e-12)
    signs = np.sign(np.sum(v * ref_v, axis=0))
    np.testing.assert_allclose(v * signs, ref_v, atol=1e-5)


def test_projection_figure_draws_the_projected_points():
    h, y = nclab.data.synthetic_features(num_classes=4, per_class=15, dim=9, seed=1)
    fig = plots.feature_projection(h, y, title="t", legend=True, class_names=list("abcd"))
    ax = fig.axes[0]
    pts, stars = ax.collections[0].get_offsets(), ax.collections[1].get_offsets()
    center, v = plots.class_mean_plane(h, y)
    z = (h.numpy() - center) @ v
    assert pts.shape == (60, 2) and stars.shape == (4, 2)
    np.testing.assert_allclose(pts, z, atol=1e-9)
    # the stars are the class means of the projected points; their mean is the origin
    np.testing.assert_allclose(stars, np.stack([z[y.numpy() == c].mean(0) for c in range(4)]),
                               atol=1e-9)
    np.testing.assert_allclose(stars.mean(0), 0, atol=1e-9)
    assert ax.get_title() == "t" and len(ax.get_legend().get_texts()) == 4
    plt.close("all")


def test_projection_in_another_sets_plane_and_on_given_axes():
    h, y = nclab.data.synthetic_features(num_classes=3, per_class=10, dim=6, seed=0)
    other, y2 = nclab.data.synthetic_features(num_classes=3, per_class=7, dim=6, seed=5)
    plane = plots.class_mean_plane(h, y)
    fig, axes = plt.subplots(1, 2)
    assert plots.feature_projection(other, y2, plane=plane, ax=axes[1], means=False) is fig
    pts = axes[1].collections[0].get_offsets()
    np.testing.assert_allclose(pts, (other.numpy() - plane[0]) @ plane[1], atol=1e-9)
    assert len(axes[1].collections) == 1 and not axes[0].collections
    with pytest.raises(ValueError, match="plane"):
        plots.feature_projection(other[:, :4], y2, plane=plane)
    plt.close("all")


def test_two_classes_complete_the_plane_with_within_class_directions():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(2).repeat_interleave(50)
    noise = torch.randn(50, 5, generator=gen, dtype=torch.float64) * torch.tensor(
        [0.1, 0.1, 0.1, 3.0, 0.1], dtype=torch.float64)      # largest within-class spread: e3
    noise[:, 0] = 0.0
    h = torch.cat([noise, noise])                            # the same spread in both classes
    h[50:, 0] = 4.0                                          # the means differ along e0 only
    _, v = plots.class_mean_plane(h, y)
    np.testing.assert_allclose(np.abs(v[:, 0]), np.eye(5)[0], atol=1e-12)
    assert abs(v[3, 1]) > 0.99 and abs(v[0, 1]) < 1e-12


def test_plane_validates_input():
    h, y = nclab.data.synthetic_features(num_classes=3, per_class=4, dim=5)
    with pytest.raises(ValueError, match="features must be"):
        plots.class_mean_plane(h[:5], y)
    with pytest.raises(ValueError, match="dims"):
        plots.class_mean_plane(h, y, dims=6)
    with pytest.raises(ValueError, match="two classes"):
        plots.class_mean_plane(h[y == 0], y[y == 0])
