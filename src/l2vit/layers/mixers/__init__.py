"""Token mixers. Importing a module registers its mixer; add one import line per new mixer file."""
from ._naive import softmax_attention_naive
from .linear_attn import LinearGlobalAttention, linear_attention, linear_attention_naive
from .softmax_attn import GlobalSoftmaxAttention
from .window_attn import LocalWindowAttention, window_key_mask, window_partition, window_reverse
