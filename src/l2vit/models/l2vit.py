"""L²ViT: The Linear Attention Resurrection in Vision Transformer

A PyTorch / timm implementation of L²ViT (Chuanyang Zheng, https://arxiv.org/abs/2501.16182): a 4-stage
hierarchical backbone whose stages alternate Local Window Attention (LWA) blocks and enhanced Linear Global
Attention (LGA) blocks (ReLU-kernel linear attention followed by a Local Concentration Module).

Numerically equivalent to the official implementation (https://github.com/ChuanyangZheng/L2ViT, commit fad0341)
and loads its checkpoints through ``checkpoint_filter_fn``. Written for the l2vit library; layout and API follow
timm's model files.

@article{zheng2025l2vit,
  title={The Linear Attention Resurrection in Vision Transformer},
  author={Zheng, Chuanyang},
  journal={arXiv preprint arXiv:2501.16182},
  year={2025}
}
"""
from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, register_notrace_function, trunc_normal_
from timm.models import (
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
    register_model_deprecations,
)
from torch import nn

from ..layers import ConvPosEnc, ConvStem, Downsample, LocalConcentration, create_mixer, get_mixer, is_local_mixer
from ..layers._compat import feature_take_indices
from ..layers._fastpath import can_overwrite, eager_inference, grad_free, unobserved
from ..layers.mlp import Mlp, mlp_residual_chunked
from ..layers.prepacked import clear_packed_weights
from ._weights import check_checkpoint_file

__all__ = ['L2ViT', 'L2ViTBlock', 'L2ViTStage', 'checkpoint_filter_fn', 'check_image_input', 'MIN_INPUT_SIZE']

_logger = logging.getLogger(__name__)

_IntOrSeq = int | Sequence[int]
_FloatOrSeq = float | Sequence[float]

# Smallest input side accepted: one stride-32 cell. Smaller images would be almost all padding at every stage.
MIN_INPUT_SIZE = 32


def _per_stage(value: Any, num_stages: int, name: str) -> list:
    """Broadcast a scalar (or a one-pattern tuple of strings) to ``num_stages`` entries, or check a per-stage list."""
    if isinstance(value, (str, int, float)) or value is None:
        return [value] * num_stages
    value = list(value)
    if len(value) != num_stages:
        raise ValueError(f'{name} must be a scalar or have one entry per stage ({num_stages}), got {value}')
    return value


def _block_patterns(block_pattern: Sequence[str] | Sequence[Sequence[str]], num_stages: int) -> list[tuple[str, ...]]:
    """Normalise ``block_pattern`` to one tuple of mixer names per stage."""
    if isinstance(block_pattern, str):
        return [(block_pattern,)] * num_stages
    block_pattern = list(block_pattern)
    if block_pattern and all(isinstance(p, str) for p in block_pattern):
        return [tuple(block_pattern)] * num_stages
    if len(block_pattern) != num_stages or not all(p and not isinstance(p, str) for p in block_pattern):
        raise ValueError(
            'block_pattern must be a sequence of mixer names (used in every stage) or one such sequence per '
            f'stage ({num_stages}), got {block_pattern}')
    return [tuple(p) for p in block_pattern]


@register_notrace_function  # reason: validates Python-level shape/dtype facts of the input
def check_image_input(x: torch.Tensor, in_chans: int, min_size: int = MIN_INPUT_SIZE) -> torch.Tensor:
    """Return ``x`` unchanged, or raise a ``ValueError`` saying what was expected of a ``(B, in_chans, H, W)`` image."""
    # the shape is formatted only on error paths: str() of a symbolic size would break torch.compile(dynamic=True)
    if x.dim() != 4:
        hint = ' (add a batch dimension with x.unsqueeze(0))' if x.dim() == 3 else ''
        raise ValueError(f'expected a 4-D image batch (B, {in_chans}, H, W), got a {x.dim()}-D tensor of shape '
                         f'{str(list(x.shape))}{hint}')
    if not x.is_floating_point():
        raise ValueError(f'expected a floating-point image tensor, got dtype {x.dtype} (convert with x.float() and '
                         'normalise, e.g. with the mean/std of the model\'s pretrained_cfg)')
    if x.shape[1] != in_chans:
        raise ValueError(f'expected {in_chans} input channels (in_chans={in_chans}), got {x.shape[1]} in an input '
                         f'of shape {str(list(x.shape))}')
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f'input spatial size {x.shape[2]}x{x.shape[3]} is below the minimum of '
                         f'{min_size}x{min_size} (one cell at the model\'s output stride of 32)')
    return x


class L2ViTBlock(nn.Module):
    """One L²ViT block on ``(B, H, W, C)`` tokens.

    For a local (windowed) mixer this is the official LWA block, for a global mixer the official LGA block::

        x = x + CPE(x)
        x = x + DropPath(Mixer(LN1(x)))
        x = x + CPE'(x)                          # local mixers: second CPE
        x = x + DropPath(LCM(LN3(x)))            # global mixers: Local Concentration Module (if use_lcm)
        x = x + DropPath(MLP(LN2(x)))

    Args:
        dim: Channels.
        num_heads: Attention heads.
        mixer: Registered token-mixer name (``'window'`` = LWA, ``'linear'`` = LGA's attention, ``'softmax'``, ...).
        window_size: Window side for local mixers.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        qkv_bias: Bias on the mixer's qkv projection.
        proj_drop: Dropout after the mixer projection and in the MLP.
        attn_drop: Dropout on attention weights (softmax mixers).
        drop_path: Stochastic-depth rate shared by the mixer, LCM and MLP branches (never the CPEs).
        use_lcm: Give a global-mixer block its Local Concentration Module (False: the "un-enhanced" LGA block,
            which has a single CPE and nothing between mixer and MLP). Ignored for local mixers.
        lcm_kernel_size: Depth-wise kernel of the LCM.
        cpe_kernel_size: Depth-wise kernel of the CPEs.
        mixer_kwargs: Extra keyword arguments for the mixer (e.g. ``clamp_min``, ``mask_padding``).
        norm_layer: Token norm.
        act_layer: Activation of the MLP and LCM.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mixer: str = 'window',
            window_size: int = 7,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            use_lcm: bool = True,
            lcm_kernel_size: int = 7,
            cpe_kernel_size: int = 3,
            mixer_kwargs: dict[str, Any] | None = None,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            act_layer: type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if is_local_mixer(mixer):
            local_module = 'cpe'
        else:
            local_module = 'lcm' if use_lcm else 'none'
        self.mixer = mixer
        self.local_module = local_module

        # registration order follows the official state_dict
        num_cpe = 2 if local_module == 'cpe' else 1
        self.cpe = nn.ModuleList([ConvPosEnc(dim, cpe_kernel_size, **dd) for _ in range(num_cpe)])
        self.norm1 = norm_layer(dim, **dd)
        self.attn = create_mixer(
            mixer, dim, num_heads,
            window_size=window_size,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            **(mixer_kwargs or {}),
            **dd,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        if local_module == 'lcm':
            self.norm3 = norm_layer(dim, **dd)
            self.local_mp = LocalConcentration(dim, lcm_kernel_size, act_layer=act_layer, **dd)
        else:
            self.norm3 = None
            self.local_mp = None

    def extra_repr(self) -> str:
        return f'mixer={self.mixer}, local_module={self.local_module}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In eager inference the residual branches write into the block's own running map where nothing can see it
        # (see _own): no fresh map-sized tensor per branch, whose pages the OS would fault in on every call. The
        # block's input is never written.
        block_in = x
        x = self.cpe[0](x)
        if torch.jit.is_scripting():
            x = x + self.drop_path(self.attn(self.norm1(x)))
        else:
            x = self._attn_branch(x, block_in)
        if self.local_mp is not None:
            if torch.jit.is_scripting():
                x = x + self.drop_path(self.local_mp(self.norm3(x)))
            else:
                x = self._lcm_branch(x, block_in)
        elif len(self.cpe) > 1:
            x = self.cpe[1](x)
        if torch.jit.is_scripting():
            return x + self.drop_path(self.mlp(self.norm2(x)))
        return self._mlp_branch(x, block_in)

    @torch.jit.unused
    def _own(self, x, block_in, producer):  # unannotated: TorchScript reads Tensors (and never calls it)
        """``x`` if this block may overwrite it, else None: a contiguous map this block made (its storage is not the
        block input's), that ``producer`` (the last module that returned it) shows no hook and no gradient needs."""
        if (x.is_contiguous() and can_overwrite(x, producer)
                and x.untyped_storage().data_ptr() != block_in.untyped_storage().data_ptr()):
            return x
        return None

    @torch.jit.unused
    def _attn_branch(self, x, block_in):  # unannotated: TorchScript reads Tensors (and never calls it)
        # mixers that offer it run norm, attention and residual over cache-sized chunks in inference (same values)
        chunked = getattr(self.attn, 'chunked_residual', None)
        if chunked is not None and eager_inference(x, self.norm1, self.attn, self.drop_path):
            out = chunked(x, self.norm1, into=self._own(x, block_in, self.cpe[0]))
            if out is not None:
                return out
        return x + self.drop_path(self.attn(self.norm1(x)))

    @torch.jit.unused
    def _lcm_branch(self, x, block_in):  # unannotated: TorchScript reads Tensors (and never calls it)
        if eager_inference(x, self.norm3, self.local_mp, self.drop_path):
            # large maps: over bands of rows, the normed and hidden maps never at full size (same values)
            out = self.local_mp.chunked_residual(x, self.norm3, into=self._own(x, block_in, self.attn))
            if out is not None:
                return out
        y = self.drop_path(self.local_mp(self.norm3(x)))
        # x is the attention branch's result (fresh, or the CPE's output written in place); norm3 saw it as input
        if (grad_free([x, y]) and unobserved(self.norm3) and torch.result_type(x, y) == x.dtype
                and x.shape == y.shape and self._own(x, block_in, self.attn) is not None):
            return x.add_(y)
        return x + y

    @torch.jit.unused
    def _mlp_branch(self, x, block_in):  # unannotated: TorchScript reads Tensors (and never calls it)
        if eager_inference(x, self.norm2, self.mlp, self.drop_path):
            producer = self.cpe[1] if len(self.cpe) > 1 else self.local_mp if self.local_mp is not None else self.attn
            out = mlp_residual_chunked(x, self.norm2, self.mlp, out=self._own(x, block_in, producer))
            if out is not None:
                return out
        return x + self.drop_path(self.mlp(self.norm2(x)))


class L2ViTStage(nn.Module):
    """Optional downsampling followed by a sequence of blocks whose mixers cycle through ``block_pattern``.

    With the default pattern ``('window', 'linear')`` block ``j`` is LWA for even ``j`` and LGA for odd ``j``,
    restarting in every stage, as in the official model.

    Args:
        dim: Input channels.
        out_dim: Channels of the stage.
        depth: Number of blocks.
        num_heads: Attention heads.
        downsample: Add a :class:`Downsample` (LN → 2×2/2 conv) at the start (all stages but the first).
        block_pattern: Mixer names, cycled over the block index.
        drop_path: Per-block stochastic-depth rates (length ``depth``).
        mixer_kwargs: Extra keyword arguments per mixer name; each block gets the entry of its own mixer.
        **block_kwargs: Passed to every :class:`L2ViTBlock`.
    """

    def __init__(
            self,
            dim: int,
            out_dim: int,
            depth: int,
            num_heads: int,
            downsample: bool = True,
            block_pattern: Sequence[str] = ('window', 'linear'),
            drop_path: Sequence[float] | None = None,
            mixer_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
            **block_kwargs,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        drop_path = list(drop_path) if drop_path is not None else [0.] * depth
        mixer_kwargs = mixer_kwargs or {}
        self.grad_checkpointing = False
        self.downsample = Downsample(dim, out_dim, norm_layer=norm_layer, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            L2ViTBlock(
                out_dim,
                num_heads,
                mixer=block_pattern[j % len(block_pattern)],
                drop_path=drop_path[j],
                mixer_kwargs=mixer_kwargs.get(block_pattern[j % len(block_pattern)]),
                norm_layer=norm_layer,
                **block_kwargs,
                **dd,
            )
            for j in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class L2ViT(nn.Module):
    """L²ViT: hierarchical vision transformer alternating local window and enhanced linear global attention.

    Tokens stay in NHWC layout inside the network (``output_fmt = 'NHWC'``); ``forward_intermediates`` and
    ``features_only`` return NCHW maps at strides 4, 8, 16 and 32.

    Args:
        in_chans: Image channels.
        num_classes: Classifier outputs (0 for no classifier).
        global_pool: Head pooling (``'avg'``; ``''`` keeps the spatial map).
        depths: Blocks per stage.
        dims: Channels per stage.
        num_heads: Heads per stage (int or per stage). Default: head dim 32, as in every released model.
        window_size: LWA window side (int or per stage).
        mlp_ratio: MLP expansion (float or per stage).
        qkv_bias: Bias on qkv projections.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after mixer projections and in MLPs.
        attn_drop_rate: Dropout on softmax attention weights.
        drop_path_rate: Maximum stochastic depth, reached linearly at the last block.
        block_pattern: Mixer names cycled over the block index in each stage, or one such pattern per stage.
            The official model is ``('window', 'linear')``; e.g. ``('window', 'softmax')`` puts global softmax
            attention in the global blocks and ``'window'`` alone gives an all-LWA network.
        global_mixer: Shortcut that puts this mixer in place of every global (non-windowed) mixer of
            ``block_pattern``, e.g. ``global_mixer='softmax'``; the blocks keep their LCM.
        use_lcm: Give global blocks the Local Concentration Module (False: the "un-enhanced" LGA).
        lcm_kernel_size: LCM depth-wise kernel.
        cpe_kernel_size: CPE depth-wise kernel.
        clamp_min: Lower clamp on the linear-attention denominator.
        mask_padding: Mask zero-padded window positions out of LWA keys (the official model does not).
        mixer_kwargs: Extra keyword arguments per mixer name, e.g. ``{'linear': {'clamp_min': 1.0}}``.
        head_init_scale: Multiplier applied to the initial classifier weights and bias.
        norm_layer: Token norm (LayerNorm, eps 1e-5).
        act_layer: Activation of MLPs and LCMs (exact GELU).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Sequence[int] = (2, 2, 6, 2),
            dims: Sequence[int] = (96, 192, 384, 768),
            num_heads: _IntOrSeq | None = None,
            window_size: _IntOrSeq = 7,
            mlp_ratio: _FloatOrSeq = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            block_pattern: Sequence[str] | Sequence[Sequence[str]] = ('window', 'linear'),
            global_mixer: str | None = None,
            use_lcm: bool = True,
            lcm_kernel_size: int = 7,
            cpe_kernel_size: int = 3,
            clamp_min: float = 100.,
            mask_padding: bool = False,
            mixer_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
            head_init_scale: float = 1.,
            norm_layer: type[nn.Module] | None = None,
            act_layer: type[nn.Module] | None = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        dims, depths = list(dims), list(depths)
        num_stages = len(dims)
        if len(depths) != num_stages:
            raise ValueError(f'depths ({depths}) and dims ({dims}) must have the same length')
        if num_heads is None:
            num_heads = [max(1, d // 32) for d in dims]
        num_heads = _per_stage(num_heads, num_stages, 'num_heads')
        window_size = _per_stage(window_size, num_stages, 'window_size')
        mlp_ratio = _per_stage(mlp_ratio, num_stages, 'mlp_ratio')
        patterns = _block_patterns(block_pattern, num_stages)
        if global_mixer is not None:
            get_mixer(global_mixer)  # unknown names fail here, listing the registered ones
            patterns = [tuple(m if is_local_mixer(m) else global_mixer for m in p) for p in patterns]
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-5)
        act_layer = act_layer or nn.GELU

        kw = {name: dict(v) for name, v in (mixer_kwargs or {}).items()}
        kw.setdefault('linear', {}).setdefault('clamp_min', clamp_min)
        kw.setdefault('window', {}).setdefault('mask_padding', mask_padding)

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.output_fmt = 'NHWC'
        self.num_features = self.head_hidden_size = dims[-1]
        self.drop_rate = drop_rate

        self.stem = ConvStem(in_chans, dims[0], norm_layer=norm_layer, **dd)

        dpr = [r.tolist() for r in torch.linspace(0, drop_path_rate, sum(depths)).split(depths)]
        stages = []
        self.feature_info = []
        prev_dim = dims[0]
        for i in range(num_stages):
            stages.append(L2ViTStage(
                prev_dim,
                dims[i],
                depth=depths[i],
                num_heads=num_heads[i],
                downsample=i > 0,
                block_pattern=patterns[i],
                drop_path=dpr[i],
                window_size=window_size[i],
                mlp_ratio=mlp_ratio[i],
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                use_lcm=use_lcm,
                lcm_kernel_size=lcm_kernel_size,
                cpe_kernel_size=cpe_kernel_size,
                mixer_kwargs=kw,
                norm_layer=norm_layer,
                act_layer=act_layer,
                **dd,
            ))
            prev_dim = dims[i]
            self.feature_info += [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)

        self.norm = norm_layer(self.num_features, **dd)
        self.head = ClassifierHead(
            self.num_features,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            input_fmt=self.output_fmt,
            **dd,
        )

        self.init_weights(head_init_scale=head_init_scale)

    @torch.jit.ignore
    def init_weights(self, head_init_scale: float = 1.) -> None:
        """Official init: trunc-normal(0.02) conv/linear weights, zero biases, default norms, temperature d^-0.5."""
        self.apply(_init_weights)
        if head_init_scale != 1. and isinstance(self.head.fc, nn.Linear):
            with torch.no_grad():
                self.head.fc.weight.mul_(head_init_scale)
                self.head.fc.bias.mul_(head_init_scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay beyond timm's automatic 1-D/bias rule: none.

        The official recipe decays the per-head attention temperatures (shape ``(heads, 1, 1)``); the training
        engine offers excluding them as an option.
        """
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def train(self, mode: bool = True) -> L2ViT:
        if mode:  # the reordered weights of CPU inference (l2vit.layers.prepacked) go stale once training starts
            clear_packed_weights(self)
        return super().train(mode)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward pass that also returns the outputs of selected stages.

        Args:
            x: Image batch ``(B, C, H, W)``.
            indices: Stages to return: last ``n`` if an int, these indices if a list, all if None.
            norm: Apply the final norm to the last stage's intermediate.
            stop_early: Stop after the last requested stage.
            output_fmt: Format of the intermediates; only ``'NCHW'``.
            intermediates_only: Return only the list of intermediates.

        Returns:
            ``(final_features, intermediates)``, or only ``intermediates``; final features are NHWC and normed.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(check_image_input(x, self.in_chans))

        last_idx = len(self.stages) - 1
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                x_inter = self.norm(x) if norm and i == last_idx else x
                intermediates.append(x_inter.permute(0, 3, 1, 2).contiguous())

        if intermediates_only:
            return intermediates
        x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and optionally norm and head) not needed for the intermediates at ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, C, H, W)`` → normed last-stage map ``(B, H/32, W/32, C4)`` (NHWC)."""
        x = self.stem(check_image_input(x, self.in_chans))
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.forward_head(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


_OFFICIAL_RENAMES = (
    (r'^downsample_layers\.0\.proj\.proj\.0\.', 'stem.conv1.'),
    (r'^downsample_layers\.0\.proj\.proj\.1\.', 'stem.bn1.'),
    (r'^downsample_layers\.0\.proj\.proj\.3\.', 'stem.conv2.'),
    (r'^downsample_layers\.0\.proj\.proj\.4\.', 'stem.bn2.'),
    (r'^downsample_layers\.0\.norm\.', 'stem.norm.'),
    (r'^downsample_layers\.(\d+)\.', r'stages.\1.downsample.'),
    (r'^stages\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
    (r'^head\.', 'head.fc.'),
)
_CLASSIFIER_KEYS = ('head.fc.weight', 'head.fc.bias')


def _select_state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """Pick the weights out of a whole training checkpoint, preferring EMA weights (the ones that scored)."""
    for key in ('model_ema', 'state_dict_ema', 'model', 'state_dict'):
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    return checkpoint


def _official_to_native(key: str) -> str:
    for pattern, repl in _OFFICIAL_RENAMES:
        key, n = re.subn(pattern, repl, key)
        if n:
            break
    return key


def _summarise_keys(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: L2ViT) -> dict[str, torch.Tensor]:
    """Map an official L²ViT state dict (or a whole official checkpoint dict) onto ``model``.

    * A training checkpoint ``{'model', 'model_ema', 'epoch', 'args', ...}`` is reduced to its EMA weights when
      present, else ``model``; ``module.`` / ``_orig_mod.`` prefixes are stripped.
    * Official container names are renamed (``downsample_layers.0`` → ``stem``, ``downsample_layers.i`` →
      ``stages.i.downsample``, ``stages.i.j`` → ``stages.i.blocks.j``, ``head`` → ``head.fc``); names inside blocks
      are the official ones. Native l2vit state dicts pass through unchanged.
    * The result is checked against ``model``: missing or unexpected keys and shape mismatches raise a
      ``ValueError`` naming them. A classifier of another size is dropped with a warning, so the model keeps its
      freshly initialised head; a checkpoint head is dropped silently when the model has none.

    Args:
        state_dict: Official or native state dict, or a checkpoint dict containing one.
        model: The model the weights are for.

    Returns:
        A state dict ready for ``model.load_state_dict``.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f'expected a state dict or checkpoint dict, got {type(state_dict).__name__}')
    state_dict = _select_state_dict(state_dict)
    native = any(k.startswith(('stem.', 'head.fc.')) or '.blocks.' in k for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f'state dict entry {k!r} is a {type(v).__name__}, expected a tensor')
        for prefix in ('module.', '_orig_mod.'):
            k = k.removeprefix(prefix)
        out[k if native else _official_to_native(k)] = v

    target = model.state_dict()
    head_keys = [k for k in _CLASSIFIER_KEYS if k in out]
    if head_keys:
        model_has_head = all(k in target for k in head_keys)
        if not model_has_head:
            for k in head_keys:
                del out[k]
        elif out['head.fc.weight'].shape[1:] == target['head.fc.weight'].shape[1:] and any(
                out[k].shape != target[k].shape for k in head_keys):
            warnings.warn(
                f'checkpoint classifier has {out["head.fc.weight"].shape[0]} classes but the model has '
                f'{model.num_classes}: the classifier (head.fc) is re-initialised, not loaded', stacklevel=2)
            for k in head_keys:
                del out[k]

    missing = [k for k in target if k not in out and k not in _CLASSIFIER_KEYS]
    unexpected = [k for k in out if k not in target]
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing key(s): {_summarise_keys(missing)}')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected key(s): {_summarise_keys(unexpected)}')
    first_conv = 'stem.conv1.weight'
    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}'
        for k, v in out.items()
        if k in target and v.shape != target[k].shape
        # timm adapts the first conv to another in_chans after this filter
        and not (k == first_conv and v.shape[0] == target[k].shape[0] and v.shape[2:] == target[k].shape[2:])
    ]
    if mismatched:
        problems.append(f'{len(mismatched)} shape mismatch(es): ' + '; '.join(mismatched[:8])
                        + (f'; ... ({len(mismatched) - 8} more)' if len(mismatched) > 8 else ''))
    if problems:
        raise ValueError(
            'checkpoint does not fit this L2ViT (depths={}, dims={}): '.format(
                [len(s.blocks) for s in model.stages], [f['num_chs'] for f in model.feature_info])
            + '; '.join(problems)
            + '. Is it a checkpoint of another architecture or another L2ViT variant?')
    return out


def _create_l2vit(variant: str, pretrained: bool = False, **kwargs) -> L2ViT:
    if pretrained:
        # a weight file named by the user is checked before timm opens it, so a truncated, foreign or unsafe file
        # gets an error naming the problem
        for cfg_key in ('pretrained_cfg_overlay', 'pretrained_cfg'):
            cfg = kwargs.get(cfg_key)
            if (isinstance(cfg, Mapping) and cfg.get('file') and not cfg.get('state_dict')
                    and cfg.get('source') != 'local-dir'):
                check_checkpoint_file(cfg['file'])
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(
        L2ViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, flatten_sequential=True, feature_cls='getter'),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'min_input_size': (3, MIN_INPUT_SIZE, MIN_INPUT_SIZE),
        'fixed_input_size': False,
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1',
        'classifier': 'head.fc',
        'paper_ids': 'arXiv:2501.16182',
        'paper_name': 'The Linear Attention Resurrection in Vision Transformer',
        'origin_url': 'https://github.com/ChuanyangZheng/L2ViT',
        **kwargs,
    }


_OFFICIAL_NOTE = (
    'Official release file {}; load it with pretrained_cfg_overlay=dict(file=PATH) or convert it once with '
    '`l2vit convert`.')

default_cfgs = generate_default_cfgs({
    'l2vit_tiny.orig_in1k': _cfg(notes=(_OFFICIAL_NOTE.format('L2ViT-Tiny-checkpoint-best-ema.pth'),)),
    'l2vit_small.orig_in1k': _cfg(notes=(_OFFICIAL_NOTE.format('L2ViT-Small-checkpoint-best-ema.pth'),)),
    'l2vit_base.orig_in1k': _cfg(notes=(_OFFICIAL_NOTE.format('L2ViT-Base-checkpoint-best-ema.pth'),)),
    'l2vit_base.orig_in22k_ft_in1k': _cfg(notes=('ImageNet-22K pre-trained, fine-tuned on ImageNet-1K at 224.',)),
    'l2vit_base.orig_in22k': _cfg(num_classes=21841, notes=('ImageNet-22K pre-training, 21841 classes.',)),
    'l2vit_base_384.orig_in22k_ft_in1k': _cfg(
        input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, crop_mode='squash',
        notes=('ImageNet-22K pre-trained, fine-tuned on ImageNet-1K at 384 (window 12).',)),
    'test_l2vit': _cfg(input_size=(3, 160, 160), pool_size=(5, 5), notes=('Tiny untrained model for tests.',)),
})


@register_model
def l2vit_tiny(pretrained: bool = False, **kwargs) -> L2ViT:
    """L²ViT-T: depths 2-2-6-2, dims 96-192-384-768 (28.6M params, 4.7 GMACs at 224)."""
    model_args = dict(depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), window_size=7)
    return _create_l2vit('l2vit_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def l2vit_small(pretrained: bool = False, **kwargs) -> L2ViT:
    """L²ViT-S: depths 2-2-18-2, dims 96-192-384-768 (50.2M params, 9.0 GMACs at 224)."""
    model_args = dict(depths=(2, 2, 18, 2), dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), window_size=7)
    return _create_l2vit('l2vit_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def l2vit_base(pretrained: bool = False, **kwargs) -> L2ViT:
    """L²ViT-B: depths 2-2-18-2, dims 128-256-512-1024 (88.6M params, 15.9 GMACs at 224)."""
    model_args = dict(depths=(2, 2, 18, 2), dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), window_size=7)
    return _create_l2vit('l2vit_base', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def l2vit_base_384(pretrained: bool = False, **kwargs) -> L2ViT:
    """L²ViT-B at 384 px with window 12 (same weights as L²ViT-B; 47.5 GMACs at 384)."""
    model_args = dict(depths=(2, 2, 18, 2), dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), window_size=12)
    return _create_l2vit('l2vit_base_384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_l2vit(pretrained: bool = False, **kwargs) -> L2ViT:
    """Tiny L²ViT for fast tests: depths 2-2-2-2, dims 16-32-64-128, head dim 16. No weights."""
    model_args = dict(depths=(2, 2, 2, 2), dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), window_size=7)
    return _create_l2vit('test_l2vit', pretrained=pretrained, **dict(model_args, **kwargs))


register_model_deprecations(__name__, {
    'L2ViT_Tiny': 'l2vit_tiny.orig_in1k',
    'L2ViT_Small': 'l2vit_small.orig_in1k',
    'L2ViT_Base': 'l2vit_base.orig_in1k',
    'L2ViT_Base_384': 'l2vit_base_384.orig_in22k_ft_in1k',
})
