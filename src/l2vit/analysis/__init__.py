"""Analysis tools: attention maps, concentration metrics and effective receptive fields of L²ViT-style models.

The paper's thesis is that linear attention lags softmax because it cannot *concentrate* its attention, and that
the Local Concentration Module restores that. These tools measure it on real images and models:

* :func:`capture_attention_inputs` records the tokens each attention mixer sees; :func:`attention_maps` and
  :func:`iter_attention_rows` recompute the weights from them and the mixer's own ``qkv`` weights (window softmax
  for LWA, the query-key-first form of the linear attention for LGA, global softmax for a softmax counterpart), and
  for every other global mixer from its ``attention_weights`` method (:func:`mixer_attention_rows`).
* :func:`attention_statistics` gives row entropy, top-k mass and attention distance per head, over all queries, in
  chunks; :func:`block_erf` the effective receptive field of a block with and without its LCM.
* :func:`analyze` / :func:`write_report` (and ``l2vit analyze``) produce figures, a JSON of every number and the
  maps as safetensors.

Figures need matplotlib (the ``analysis`` extra); everything else needs only torch and timm.
"""
from .attention_maps import (
    ROW_METRICS_RULE,
    ROW_SEMANTICS,
    RowChunk,
    attention_maps,
    global_attention_rows,
    iter_attention_rows,
    linear_attention_rows,
    mixer_attention_rows,
    project_qkv,
    row_semantics,
    softmax_attention_rows,
    window_attention_weights,
)
from .capture import (
    SUPPORTED_MIXERS,
    AttentionInput,
    attention_blocks,
    capture_attention_inputs,
    capture_module_inputs,
    has_attention_rows,
    query_tokens,
)
from .erf import block_erf, effective_receptive_field, erf_statistics, image_erf, lcm_disabled
from .images import ImageBatch, find_images, images_from_tensor, load_images
from .loading import build_variant, default_variants, describe_model, load_model
from .metrics import (
    DEFAULT_TOPK,
    AttentionStats,
    attention_statistics,
    entropy,
    mean_distance,
    normalized_entropy,
    renormalize_rows,
    topk_mass,
)
from .report import (
    DEFAULT_QUERY_POINTS,
    AnalysisResult,
    BlockResult,
    ErfResult,
    SourceResult,
    analyze,
    analyze_model,
    write_report,
)
