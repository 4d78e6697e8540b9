"""Token mixers. Importing a module registers its mixer; add one import line per new mixer file."""
from ._naive import softmax_attention_naive
from .castling import LinearAngularAttention, SparseLinearAngularAttention, castling_from_official
from .fcvit import FCViTTokenMixer, GlobalContext, fcvit_from_official
from .flatten import FocusedLinearAttention, flatten_from_official, focused_linear_attention
from .inline import InLineAttention, injective_linear_attention, injective_linear_attention_naive, inline_from_official
from .linear_attn import TEMPERATURE_PLACEMENTS, LinearGlobalAttention, linear_attention, linear_attention_naive
from .rala import RankAugmentedLinearAttention, rala_from_official, rala_linear_attention, rala_linear_attention_naive
from .rala_softmax import RALASoftmaxAttention
from .rmt import DecomposedManhattanSelfAttention, ManhattanSelfAttention, masa_from_official
from .softmax_attn import GlobalSoftmaxAttention
from .vicinity import VicinityAttention, vicinity_attention_naive, vicinity_from_official, vicinity_linear_attention
from .vig_gla import BidirectionalGatedLinearAttention, bidirectional_gla, vig_gla_from_official
from .vitality import TaylorAttention, taylor_lowrank_attention, taylor_lowrank_attention_naive, vitality_from_official
from .window_attn import LocalWindowAttention, window_key_mask, window_partition, window_reverse
