"""Euler on the noise levels for the UNet families: what the few-step distillations (SDXL-
Lightning, Hyper-SD and the like) ship in their scheduler config, an ``EulerDiscreteScheduler``
with ``trailing`` timestep spacing. Running such a model with DDIM (the UNet loop's default)
would follow another path than the one it was distilled on.

Per sample, as ``DDIMStepper`` is: each member at its own step, one UNet call. The model sees
``x / sqrt(sigma^2 + 1)`` at the discrete timestep; the update is
``x + (sigma_next - sigma) * (x - x0) / sigma`` (``s_churn`` = 0: no noise added), which is
``EulerDiscreteScheduler.step``. A cached latent at K is the point after K such steps, so a
request resumes from it as with DDIM.
"""

from __future__ import annotations

import torch

from promptserve.engine.denoise import DDIMStepper

FEW_STEP_SPACING = "trailing"  # the spacing the distillations are trained on


def takes_euler(scheduler) -> bool:  # noqa: ANN001 - a diffusers scheduler
    """Whether a folder's scheduler is one this stepper runs as its pipeline would: Euler
    with trailing spacing, linear interpolation of the sigmas, no Karras, exponential or beta
    sigmas, sigmas ending at zero."""
    config = scheduler.config
    return (
        type(scheduler).__name__ == "EulerDiscreteScheduler"
        and config.get("timestep_spacing") == FEW_STEP_SPACING
        and config.get("interpolation_type", "linear") == "linear"
        and not any(
            config.get(k)
            for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
        )
        and config.get("final_sigmas_type", "zero") == "zero"
        and config.get("timestep_type", "discrete") == "discrete"
        and not config.get("rescale_betas_zero_snr", False)
    )


class EulerStepper(DDIMStepper):
    scheduler_name = "EulerDiscreteScheduler"

    def _schedule(self, scheduler, total_steps: int) -> None:  # noqa: ANN001
        scheduler.set_timesteps(total_steps)
        # per step index: the timestep the UNet sees and the noise levels at it and after it
        self.timesteps = scheduler.timesteps.to(self.c.device)
        self.sigmas = scheduler.sigmas.to(self.c.device, torch.float32)

    def _model_input(self, latents: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        sigma = self._at(self.sigmas[steps], latents)
        return latents / (sigma**2 + 1) ** 0.5

    def _update(
        self, latents: torch.Tensor, guided: torch.Tensor, steps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self._at(self.sigmas[steps], latents)
        sigma_next = self._at(self.sigmas[steps + 1], latents)
        x = latents.float()
        if self.v_prediction:
            x0 = guided.float() * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        else:
            x0 = x - sigma * guided.float()
        out = x + (x - x0) / sigma * (sigma_next - sigma)
        return out.to(latents.dtype), x0.to(latents.dtype)

    @staticmethod
    def _at(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.view((-1,) + (1,) * (like.dim() - 1))
