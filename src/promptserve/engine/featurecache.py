"""Feature caching for the UNet families: DeepCache's scheme, per member.

Adjacent denoising steps change a UNet's deep features little (Ma et al., DeepCache, CVPR
2024). Every ``r``-th step of a member is a full step that also keeps the deep feature: the
input of the last (shallowest) up block, which the deeper down blocks, the middle block and the
other up blocks produce. The steps in between are cached steps: the time embedding, the input
convolution, the first down block and the last up block, run on the kept deep feature, with
the first down block's fresh skip connections. ``r = 1`` is the UNet's own forward. The cost
of a cached step is fixed by the model (the shallow branch's share), so a scheduler can count
on it; its quality is DeepCache's published trade-off (``quality.py``).

``unet_forward`` mirrors ``UNet2DConditionModel.forward`` for the configurations served
(text-conditioned SD 1.x/2.x and SDXL: no ControlNet residuals, class labels or GLIGEN), calls
the same modules in the same order, and equals it (``tests/test_featurecache.py``).
"""

from __future__ import annotations

import torch


def unet_forward(
    unet,  # noqa: ANN001 - a diffusers UNet2DConditionModel
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict | None = None,
    deep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's noise prediction and the deep feature. With ``deep`` (a cached step), only
    the shallow branch runs, on it; without (a full step), every block runs and the deep
    feature it made is returned for the cached steps after it."""
    up = len(unet.up_blocks)
    factor = 2**unet.num_upsamplers
    forward_size = any(dim % factor for dim in sample.shape[-2:])
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    aug = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    context = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    x = unet.conv_in(sample)
    res: tuple[torch.Tensor, ...] = (x,)
    if deep is not None:  # the first down block without its downsampler: no one reads it
        res += _shallow_down(unet.down_blocks[0], x, emb, context)
    for block in unet.down_blocks if deep is None else ():
        if getattr(block, "has_cross_attention", False):
            x, more = block(hidden_states=x, temb=emb, encoder_hidden_states=context)
        else:
            x, more = block(hidden_states=x, temb=emb)
        res += more
    if deep is None:
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                x = unet.mid_block(x, emb, encoder_hidden_states=context)
            else:
                x = unet.mid_block(x, emb)
        for i, block in enumerate(unet.up_blocks[:-1]):
            skips, res = res[-len(block.resnets) :], res[: -len(block.resnets)]
            size = res[-1].shape[2:] if forward_size and i < up - 1 else None
            x = _up(block, x, emb, skips, context, size)
        deep = x
    last = unet.up_blocks[-1]
    x = _up(last, deep, emb, res[-len(last.resnets) :], context, None)
    if unet.conv_norm_out:
        x = unet.conv_act(unet.conv_norm_out(x))
    return unet.conv_out(x), deep


def _shallow_down(block, x, emb, context) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """A down block's resnets (and attentions) as its forward runs them, less the downsampler:
    the skips the last up block takes."""
    outs: tuple[torch.Tensor, ...] = ()
    attentions = getattr(block, "attentions", None)
    for i, resnet in enumerate(block.resnets):
        x = resnet(x, emb)
        if attentions is not None:
            x = attentions[i](x, encoder_hidden_states=context, return_dict=False)[0]
        outs += (x,)
    return outs


def _up(block, x, emb, skips, context, size):  # noqa: ANN001, ANN202 - diffusers' blocks
    if getattr(block, "has_cross_attention", False):
        return block(
            hidden_states=x, temb=emb, res_hidden_states_tuple=skips,
            encoder_hidden_states=context, upsample_size=size,
        )  # fmt: skip
    return block(hidden_states=x, temb=emb, res_hidden_states_tuple=skips, upsample_size=size)


def is_full_step(steps_done_since_join: int, interval: int) -> bool:
    """A member's step is full every ``interval`` steps from its first (1: every step)."""
    return interval <= 1 or steps_done_since_join % interval == 0
