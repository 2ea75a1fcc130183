"""Tiny DeepSeek-V3 configs that differ in groups, heads, LoRA ranks and head dims.

Dims deliberately include sizes that are not multiples of 128 and sizes that cross a 128 block.
"""

from dsv3.synthetic.checkpoint import DEMO

_V3 = {k: v for k, v in DEMO.items() if k not in ("vocab_size",)}

CONFIGS = {
    # V3-like proportions, small
    "v3ish": {**_V3, "vocab_size": 384},
    # no q LoRA (V2-Lite style wq), odd head count, hidden not a multiple of 128
    "noqlora": {**_V3, "vocab_size": 300, "hidden_size": 200, "intermediate_size": 136, "moe_intermediate_size": 56,
                "num_attention_heads": 3, "num_key_value_heads": 3, "q_lora_rank": None, "kv_lora_rank": 72,
                "qk_nope_head_dim": 24, "qk_rope_head_dim": 8, "v_head_dim": 40, "n_routed_experts": 12,
                "num_experts_per_tok": 3, "n_group": 3, "topk_group": 1, "num_hidden_layers": 2,
                "first_k_dense_replace": 0, "n_shared_experts": 2},
    # dims that cross 128-blocks (partial edge blocks in every FP8 scale), more groups
    "blocks": {**_V3, "vocab_size": 320, "hidden_size": 320, "intermediate_size": 300, "moe_intermediate_size": 130,
               "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 160, "kv_lora_rank": 144,
               "qk_nope_head_dim": 48, "qk_rope_head_dim": 32, "v_head_dim": 64, "n_routed_experts": 16,
               "num_experts_per_tok": 4, "n_group": 8, "topk_group": 3, "num_hidden_layers": 3,
               "first_k_dense_replace": 2},
}

# every split dim divides into 128-row blocks at N = 4, so FP8 reshards at 1, 2 and 4
ALIGNED = {**_V3, "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 512,
           "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 128, "kv_lora_rank": 128,
           "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 8,
           "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "num_hidden_layers": 2, "first_k_dense_replace": 1}
