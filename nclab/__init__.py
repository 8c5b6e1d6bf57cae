"""nclab: neural collapse and transfer learning.

Collapse metrics on the GPU, layer taps, probes, the paper's fine-tuning methods, source
pre-training and few-shot evaluation, as used by the course. Metrics, transferability scores and
runtime helpers are re-exported here; the rest lives in its submodule (``nclab.finetune``, ...).
"""

from __future__ import annotations

from . import (  # noqa: F401  (submodules are part of the public API)
    accumulators,
    collapse,
    correlation,
    data,
    features,
    fewshot,
    finetune,
    grading,
    metrics,
    mirror,
    models,
    paper,
    plots,
    pretrain,
    probe,
    recompute,
    runtime,
    train,
    transfer,
    widgets,
)
from .metrics import *  # noqa: F401,F403
from .runtime import *  # noqa: F401,F403
from .transfer import *  # noqa: F401,F403

__version__ = "0.1.0"
