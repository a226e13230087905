from dtr_scale.models.dit import DiT, DiT_models, DiTBlock
from dtr_scale.models.routing import DTRConfig, dtr_mask_table

__all__ = ["DiT", "DiTBlock", "DiT_models", "DTRConfig", "dtr_mask_table"]
