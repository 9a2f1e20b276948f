"""Networks in TrigFlow units: the TrigFlowUNet and the adaptive-weighting head."""

from scm_lightning.nets.trigflow_unet import TrigFlowUNet, TrigFlowUNetOutput
from scm_lightning.nets.weighting import LogVarHead, positional_embedding

__all__ = ["LogVarHead", "TrigFlowUNet", "TrigFlowUNetOutput", "positional_embedding"]
