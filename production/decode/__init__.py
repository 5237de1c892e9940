"""What the serving engine decodes with: the static decoder (`static_decode`: static KV
cache, one CUDA graph per token, adapters merged in place), GPT-OSS's expert kernels
(`moe_decode`, bf16 and NF4) and attention kernel (`decode_attention`), and the per-step
logits steering (`steering`: bias, penalties, log-probs, the grammar) with the grammar it is
given (`answer_grammar`, from the chat format's answer shape; `json_schema`, what of a JSON
Schema the grammar enforces).

Imports neither the engine nor the model loading (pyproject.toml's layers inside production).
"""
