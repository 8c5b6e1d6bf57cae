"""Chapter 05's per-profile study of the fine-tuning methods (:class:`FineTuneStudy`,
:func:`study`): which network, data, block, sweep and seeds each profile runs, the recipe of one
experiment (:meth:`FineTuneStudy.run`, through :func:`nclab.train.run_method`) and the claims the
chapter asserts. It sits above :mod:`nclab.finetune` and :mod:`nclab.train` (it uses both), so
neither imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nclab.finetune import adapt_norm_stats, features_nc1
from nclab.train import run_method

__all__ = ["CLAIMS", "FineTuneStudy", "study"]

# the claims chapter 05 can assert (``FineTuneStudy.checked`` names those that held on every seed)
CLAIMS: tuple[str, ...] = (
    "nc1_ranks_methods",        # Spearman(train NC1, accuracy) over Table 3's methods <= -0.6
    "one_block_beats_probe",    # Layer FT and SCL FT above the linear probe
    "full_most_accurate",       # full FT the most accurate of Table 3's methods
    "scl_beats_layer",          # SCL FT more accurate than Layer FT
    "second_one_block_beats_probe",   # the same two on the second network
    "second_full_most_accurate",
    "scarce_one_block_beats_probe",   # Fig. 8: at every data size
    "scarce_full_not_below_probe",    # Fig. 8: full FT never below the linear probe
    "lowest_nc1_block_is_best",       # Fig. 14: the block of lowest NC1 is the most accurate
)

# methods whose frozen prefix a study trains from a cache (``FineTuneStudy.cache``)
_CACHEABLE = ("linear", "mlp", "layer", "scl", "layer_lora", "layer_lp", "blocks")



@dataclass(frozen=True)
class FineTuneStudy:
    """What the fine-tuning chapter runs in one profile; every profile difference of the chapter
    is here (read by the chapter, tested in ``tests/test_finetune_protocol.py``).

    ``backbone``: the registry name of the network (``smoke``: a ``convnet_s`` the chapter
    pre-trains on digits 0-4, see :meth:`load`). ``second``: a network of another family for
    Table 3 on a second architecture (None: not run). ``per_class``: downstream training images
    per class (None = all). ``block``: Block k (None: :func:`nclab.models.default_block`).
    ``tune_sweep``: the tuned blocks of Fig. 7; ``sweep(L)``: those of Figs. 9a and 14;
    ``many(L)``: the numbers of last blocks tuned together (Fig. 9b). ``sweep_seeds``: seeds of
    the Fig. 14 sweep. ``cache``: train the frozen-prefix methods from a cache of its output
    (:func:`nclab.train.fit` ``cache_prefix``; the BatchNorm statistics are first re-estimated on
    the downstream data, :func:`~nclab.finetune.adapt_norm_stats`). ``checked``: the claims the
    chapter asserts, those that held on every seed measured for this profile."""

    profile: str
    backbone: str
    downstream: str
    epochs: int
    batch_size: int
    seeds: tuple[int, ...]
    shots: tuple[int, ...]
    block: int | None = None
    lora_rank: int = 96
    tune_sweep: tuple[int, ...] = (1, 3, 5, 7)
    sweep_step: int = 2
    image_size: int | None = None
    per_class: int | None = None
    cache: bool = False
    second: str | None = None
    second_block: int | None = None
    sweep_seeds: tuple[int, ...] = (0,)
    scarce_shots: tuple[int, ...] | None = None
    checked: tuple[str, ...] = ()

    def scarce_sizes(self, per_class: int) -> list[int]:
        """Training images per class of the Fig. 8 subsets: ``scarce_shots`` (default ``shots``)
        below ``per_class``, the size of the full training set, whose point is Table 3's runs."""
        return [n for n in (self.scarce_shots or self.shots) if n < per_class]

    def tuned_block(self, backbone: nn.Module, *, second: bool = False) -> int:
        """Block k of Table 3 for ``backbone``: ``block`` (``second_block`` for the second
        network), else :func:`nclab.models.default_block` (``layer3.0`` of a ResNet)."""
        from nclab.models import default_block

        k = self.second_block if second else self.block
        return k if k is not None else default_block(backbone)

    def adapt(self, backbone: nn.Module, data) -> nn.Module:
        """The backbone every method starts from on ``data``: with ``cache`` its BatchNorm
        statistics re-estimated on ``data`` (:func:`~nclab.finetune.adapt_norm_stats`, the paper's App. E: the
        normalisation layers adapt for every method), else ``backbone`` itself (then they update
        during training)."""
        if not self.cache:
            return backbone
        return adapt_norm_stats(backbone, data, batch_size=self.batch_size,
                                image_size=self.image_size)

    def run(self, backbone: nn.Module, method: str, train, test, *, block=None, seed: int = 0,
            epochs: int | None = None, train_nc1: bool = False, **fit_kwargs: Any) -> dict[str, Any]:
        """One experiment with this study's recipe (:func:`nclab.train.run_method`: epochs,
        batch size, image size, LoRA rank, cached prefix for the frozen-prefix methods). With
        ``train_nc1`` the row also holds ``train_nc1``, NC1 of the classifier's input on
        ``train`` (:func:`~nclab.finetune.features_nc1`; ``nc1`` is the test set's). The trained model is not
        kept in the row."""
        epochs = epochs or self.epochs
        if method == "layer_lora":
            fit_kwargs.setdefault("prepare_kwargs", {"lora_rank": self.lora_rank})
        if self.cache and method in _CACHEABLE:
            fit_kwargs.setdefault("cache_prefix", True)
        fit_kwargs.setdefault("eval_every", epochs)
        fit_kwargs.setdefault("progress", False)
        row = run_method(backbone, method, train, test, epochs, num_classes=train.num_classes,
                         block=self.tuned_block(backbone) if block is None else block, seed=seed,
                         batch_size=self.batch_size, image_size=self.image_size, **fit_kwargs)
        model = row.pop("model")
        if train_nc1:
            row["train_nc1"] = features_nc1(model, train, batch_size=self.batch_size,
                                            image_size=self.image_size)
        return row

    def load_second(self) -> nn.Module | None:
        """The second pre-trained network (``second``), None if the study has none. ``smoke``:
        a shallower, wider ``convnet_s`` pre-trained on digits 0-4 like the first."""
        if self.second is None:
            return None
        from nclab.models import load_backbone

        if self.profile != "smoke":
            return load_backbone(self.second)
        from nclab.data import class_subset, digits
        from nclab.pretrain import pretrain
        from nclab.runtime import profile as get_profile

        source = class_subset(digits("train", size=16), range(5))
        torch.manual_seed(1)
        net = load_backbone("convnet_s", pretrained=False, width=12, depth=4)
        return pretrain(net, source, epochs=get_profile("smoke").pretrain_epochs, seed=1,
                        progress=False)

    def sweep(self, num_blocks: int) -> list[int]:
        """Blocks tuned one at a time (Figs. 9a, 14): every ``sweep_step``-th block, the tuned
        block, ``tune_sweep`` and the last block (``real``: the first of each stage and the last
        two)."""
        if self.profile == "real":
            return sorted({*self.tune_sweep, num_blocks - 1, num_blocks})
        chosen = set(range(1, num_blocks + 1, self.sweep_step)) | {num_blocks, *self.tune_sweep}
        if self.block is not None:
            chosen.add(self.block)
        return sorted(k for k in chosen if 1 <= k <= num_blocks)

    def many(self, num_blocks: int) -> list[int]:
        """Numbers ``n`` of last blocks tuned together for Fig. 9b (``n >= 2``)."""
        if self.profile == "real":
            return [2, 3, 2 * num_blocks // 3]
        return [n for n in self.sweep(num_blocks) if n >= 2]

    def load(self, device: torch.device | str | None = None):
        """``(backbone, train, test)``: the pre-trained network and the downstream data, on
        ``device`` (uint8 images)."""
        from nclab.data import class_subset, digits, load, subset_per_class
        from nclab.models import load_backbone

        if self.profile == "smoke":
            from nclab.pretrain import pretrain
            from nclab.runtime import profile as get_profile

            train_all, test_all = digits("train", size=16), digits("test", size=16)
            source = class_subset(train_all, range(5))      # pre-training task: digits 0-4
            train = class_subset(train_all, range(5, 10))   # downstream task: digits 5-9
            test = class_subset(test_all, range(5, 10))
            torch.manual_seed(0)
            net = load_backbone("convnet_s", pretrained=False, width=8, depth=6)
            backbone = pretrain(net, source, epochs=get_profile("smoke").pretrain_epochs,
                                seed=0, progress=False)
        else:
            size = self.image_size or 32
            train = load(self.downstream, "train", image_size=size)
            test = load(self.downstream, "test", image_size=size)
            backbone = load_backbone(self.backbone)
        if self.per_class:
            train = subset_per_class(train, self.per_class, seed=0)
        if device is not None:
            train, test = train.to(device), test.to(device)
        return backbone, train, test


def study(profile=None) -> FineTuneStudy:
    """The fine-tuning chapter's :class:`FineTuneStudy` for ``profile`` (a name, a
    :class:`~nclab.runtime.Profile`, or None for the active one)."""
    from nclab.runtime import profile as active_profile

    prof = active_profile(profile)
    common = dict(profile=prof.name, epochs=prof.finetune_epochs, batch_size=prof.batch_size,
                  seeds=prof.seeds, shots=prof.shots_per_class)
    if prof.name == "smoke":
        return FineTuneStudy(**common, backbone="convnet_s", downstream="digits", block=4,
                             lora_rank=4, tune_sweep=(1, 3, 5), sweep_step=1,
                             second="convnet_s", second_block=3, sweep_seeds=prof.seeds,
                             checked=("nc1_ranks_methods", "one_block_beats_probe",
                                      "full_most_accurate", "second_one_block_beats_probe",
                                      "scarce_one_block_beats_probe",
                                      "scarce_full_not_below_probe"))
    if prof.name == "real":
        return FineTuneStudy(**common, backbone=prof.models[0], downstream=prof.downstream[0],
                             lora_rank=8, tune_sweep=(1, 4, 7), per_class=50, cache=True,
                             second="pyhessian_resnet20", sweep_seeds=prof.seeds,
                             scarce_shots=(3, 10),
                             checked=("nc1_ranks_methods", "one_block_beats_probe",
                                      "full_most_accurate", "scl_beats_layer",
                                      "second_one_block_beats_probe",
                                      "second_full_most_accurate",
                                      "scarce_one_block_beats_probe",
                                      "scarce_full_not_below_probe"))
    # a rehearsal tunes fewer blocks one at a time (Figs. 9a, 14): the first, block k, the one
    # after it and the last
    sweep = dict(tune_sweep=(1,), sweep_step=8) if prof.rehearsal else {}
    return FineTuneStudy(**common, backbone="resnet50", downstream=prof.downstream[0], block=8,
                         image_size=prof.image_size, per_class=prof.max_train_per_class,
                         second="resnet18", **sweep)
