"""TrigFlow-native networks: ``c_noise(t) = t`` (spec §1), e.g. our own ``TrigFlowUNet``."""

from __future__ import annotations

from torch import Tensor, nn

from scm_lightning.teachers.base import NetAdapter, as_time_batch, time_dtype


class TrigFlowNative(NetAdapter):
    """Wrap a net that already predicts F in TrigFlow units from ``(x_t/σ_d, t)``.

    The net is called as ``net(x_scaled, t, class_labels=..., guidance=...)`` with ``t`` the
    TrigFlow time in radians ``(B,)`` (float32, or float64 for a float64 input); its output
    (a tensor or an object with ``.sample``) is F itself.
    """

    def __init__(self, net: nn.Module, sigma_data: float) -> None:
        super().__init__(net, sigma_data)

    def forward(
        self,
        x_scaled: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        t = as_time_batch(t, x_scaled.shape[0], x_scaled).to(time_dtype(x_scaled))
        return self.call_net(x_scaled, t, class_labels, guidance)
