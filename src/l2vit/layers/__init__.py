"""Reusable L²ViT building blocks (no model wiring)."""
from ._fastpath import fast_paths
from ._registry import create_mixer, get_mixer, is_local_mixer, list_mixers, register_mixer
from .cpe import ConvPosEnc
from .dwconv import depthwise_conv2d, depthwise_weight_grad
from .lcm import LocalConcentration
from .mixers import (
    TEMPERATURE_PLACEMENTS,
    GlobalSoftmaxAttention,
    LinearGlobalAttention,
    LocalWindowAttention,
    linear_attention,
    linear_attention_naive,
    softmax_attention_naive,
    window_key_mask,
    window_partition,
    window_reverse,
)
from .padding import pad_nchw_to_multiple, pad_nhwc_to_multiple
from .prepacked import clear_packed_weights, linear_inference
from .stem import ConvStem, Downsample
