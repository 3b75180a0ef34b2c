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


class BlockCache:
    """Feature caching for the transformer families (SD3, Flux): the first transformer block
    always runs; on a cached step every later block is skipped and the stack's output is the
    first block's output plus the residual the later blocks added at the member's last full
    step (the "first block" variant of FORA-style block reuse, as cache-dit's DBCache F1B0
    does; one residual per stream per member, not one per block). Installed as thin wrappers
    around the model's own blocks, so the model's forward is untouched; ``mode`` per call:
    ``None`` runs every block as it is, ``record`` runs them and keeps the residual,
    ``replay`` skips them and adds ``residual``."""

    def __init__(self, transformer) -> None:  # noqa: ANN001 - SD3Transformer2DModel, FluxTransformer2DModel
        blocks = [*transformer.transformer_blocks]
        singles = list(getattr(transformer, "single_transformer_blocks", []))
        everything = blocks + singles
        if len(everything) < 2:
            raise ValueError("block caching needs at least two transformer blocks")
        self.mode: str | None = None
        self.residual: tuple[torch.Tensor | None, torch.Tensor] | None = None
        self._start: tuple[torch.Tensor | None, torch.Tensor] | None = None
        for i, block in enumerate(everything):
            role = "first" if i == 0 else ("last" if i == len(everything) - 1 else "middle")
            wrapped = _CachedBlock(block, self, role)
            if i < len(blocks):
                transformer.transformer_blocks[i] = wrapped
            else:
                transformer.single_transformer_blocks[i - len(blocks)] = wrapped


class _CachedBlock(torch.nn.Module):
    def __init__(self, block: torch.nn.Module, cache: BlockCache, role: str) -> None:
        super().__init__()
        self.block, self.role = block, role
        self.__dict__["cache"] = cache  # not a submodule: shared by every wrapper

    def __getattr__(self, name: str):  # noqa: ANN204 - the block's attributes (context_pre_only)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)

    def forward(self, hidden_states, encoder_hidden_states=None, **kwargs):  # noqa: ANN001, ANN201
        cache = self.cache
        if cache.mode == "replay" and self.role != "first":
            if self.role == "middle":
                return encoder_hidden_states, hidden_states
            enc_res, hid_res = cache.residual
            enc = None if enc_res is None else encoder_hidden_states + enc_res
            return enc, hidden_states + hid_res
        enc, hid = self.block(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, **kwargs
        )
        if cache.mode == "record":
            if self.role == "first":
                cache._start = (enc, hid)
            elif self.role == "last":
                start_enc, start_hid = cache._start
                enc_res = None if enc is None else enc - start_enc
                cache.residual = (enc_res, hid - start_hid)
        return enc, hid


def member_rows(batch: torch.Tensor | None, n: int, doubled: bool) -> list[torch.Tensor | None]:
    """Each member's rows of a call's feature: row j, and row n + j where the call also ran
    the members' negative passes (classifier-free guidance: ``doubled``)."""
    if batch is None:
        return [None] * n
    if not doubled:
        return [batch[j : j + 1] for j in range(n)]
    return [torch.cat([batch[j : j + 1], batch[n + j : n + j + 1]]) for j in range(n)]


def batch_rows(members: list[torch.Tensor | None], doubled: bool) -> torch.Tensor | None:
    """``member_rows`` undone: the call's feature from its members' (in the call's order)."""
    if members[0] is None:
        return None
    if not doubled:
        return torch.cat(members)
    return torch.cat([m[0:1] for m in members] + [m[1:2] for m in members])


class LayerCache:
    """Block reuse for a single-stream transformer over one sequence per member, image tokens
    first (Z-Image's main layers): the first layer always runs; on a cached step the later
    ones are skipped and the image tokens' output is the first layer's plus the residual the
    later ones added at the member's last full step. Only the first ``image_tokens`` positions
    are kept (the text tokens after them are read by no layer after these, and their count is
    the call's longest prompt, not the member's). ``mode`` and ``residual`` as ``BlockCache``."""

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        if len(layers) < 2:
            raise ValueError("block caching needs at least two transformer layers")
        self.mode: str | None = None
        self.residual: torch.Tensor | None = None
        self.image_tokens = 0  # set per call: the latent's patch count
        self._start: torch.Tensor | None = None
        for i, layer in enumerate(layers):
            role = "first" if i == 0 else ("last" if i == len(layers) - 1 else "middle")
            layers[i] = _CachedLayer(layer, self, role)


class _CachedLayer(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module, cache: LayerCache, role: str) -> None:
        super().__init__()
        self.layer, self.role = layer, role
        self.__dict__["cache"] = cache

    def forward(self, x, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        cache, n = self.cache, self.cache.image_tokens
        if cache.mode == "replay" and self.role != "first":
            if self.role == "middle":
                return x
            out = x.clone()
            out[:, :n] = x[:, :n] + cache.residual
            return out
        out = self.layer(x, *args, **kwargs)
        if cache.mode == "record":
            if self.role == "first":
                cache._start = out[:, :n]
            elif self.role == "last":
                cache.residual = out[:, :n] - cache._start
        return out
