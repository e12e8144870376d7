"""Drop-in image-text contrastive losses that re-weight the two InfoNCE directions every step.

The losses take ``(image_features, text_features, logit_scale)`` as open_clip's ``ClipLoss`` does:

>>> from adaptive_contrastive import VarianceAwareInfoNCE
>>> loss_fn = VarianceAwareInfoNCE()
>>> loss = loss_fn(image_features, text_features, logit_scale)
"""

from .adaptive import AdaptiveInfoNCE, EntropyWeighted, SpreadWeighted, VarianceAwareInfoNCE
from .base import ContrastiveLoss
from .functional import (
    adaptive_info_nce,
    entropy_weighted_info_nce,
    spread_weighted_info_nce,
    symmetric_info_nce,
    variance_aware_info_nce,
)
from .outputs import ContrastiveLossOutput
from .statistics import DirectionSummary
from .symmetric import SymmetricInfoNCE
from .temperature import LogitScale, clamp_logit_scale_

__version__ = "0.1.0"

__all__ = [
    "AdaptiveInfoNCE",
    "ContrastiveLoss",
    "ContrastiveLossOutput",
    "DirectionSummary",
    "EntropyWeighted",
    "LogitScale",
    "SpreadWeighted",
    "SymmetricInfoNCE",
    "VarianceAwareInfoNCE",
    "adaptive_info_nce",
    "clamp_logit_scale_",
    "entropy_weighted_info_nce",
    "spread_weighted_info_nce",
    "symmetric_info_nce",
    "variance_aware_info_nce",
]
