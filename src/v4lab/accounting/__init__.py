"""The model's arithmetic: parameters, KV-cache bytes and FLOPs of a ModelConfig.

The one FLOP model of the project: the chips' roofline projection, the run's
``cost/train_flops_per_token`` and the benchmarks' MFU figures all count with these
functions. Nothing here builds a model; :func:`cross_check_model` compares the counts with
a built one (tests point it at every experiment).

One job per module, each importing only those below it (.importlinter):

    check     the counts against a built Transformer; torch's FLOP counter for CPU
    flops     FLOPs per token: forward by part, training, prefill, decode
    params    parameters, total and active, per piece
    kv        KV-cache bytes: per token, held after L tokens, read per decode step
    keys      which entries a query uses: V4 layer kinds, block ratios, key counts

Every public name is re-exported here, so ``from v4lab.accounting import param_counts``
and ``accounting.train_flops_per_token(...)`` work without naming the module.
"""

from v4lab.accounting.check import cross_check_model, flop_counter
from v4lab.accounting.flops import (
    decode_flops_per_token,
    forward_flops_per_token,
    prefill_flops_per_token,
    train_flops_per_token,
)
from v4lab.accounting.keys import (
    mean_causal_keys,
    v4_causal_key_counts,
    v4_key_counts,
    v4_layer_kinds,
    v4_mtp_kind,
    v4_ratio,
)
from v4lab.accounting.kv import (
    DTYPE_BYTES,
    SCALE_BYTES,
    decode_kv_read_bytes,
    indexer_bytes_per_token_layer,
    kv_bytes_held,
    kv_bytes_per_token,
    kv_bytes_per_token_layer,
    mla_kv_bytes,
    v4_entry_bytes,
    v4_index_key_bytes,
    v4_layer_bytes_held,
    v4_layer_bytes_per_token,
    v4_window_bytes,
)
from v4lab.accounting.params import (
    attention_params,
    compressor_params,
    engram_table_rows,
    hc_head_params,
    hc_site_params,
    layer_attention_params,
    param_counts,
    v4_attention_params,
)

__all__ = [
    "DTYPE_BYTES", "SCALE_BYTES", "attention_params", "compressor_params", "cross_check_model",
    "decode_flops_per_token", "decode_kv_read_bytes", "engram_table_rows", "flop_counter",
    "forward_flops_per_token", "hc_head_params", "hc_site_params",
    "indexer_bytes_per_token_layer", "kv_bytes_held", "kv_bytes_per_token",
    "kv_bytes_per_token_layer", "layer_attention_params", "mean_causal_keys", "mla_kv_bytes",
    "param_counts", "prefill_flops_per_token", "train_flops_per_token", "v4_attention_params",
    "v4_causal_key_counts", "v4_entry_bytes", "v4_index_key_bytes", "v4_key_counts",
    "v4_layer_bytes_held", "v4_layer_bytes_per_token", "v4_layer_kinds", "v4_mtp_kind",
    "v4_ratio", "v4_window_bytes",
]
