"""llama.cpp's quantization type names: the recipe schema checks a recipe's quants against them before any work
starts, and quantize/ hands them to llama.cpp. They live in ft/ because ft/ never imports quantize/.

    >>> QUANT_TYPES["Q4_K_M"], "IQ2_XXS" in NEEDS_IMATRIX
    (15, True)
"""

from __future__ import annotations

# llama.cpp file types (enum llama_ftype in llama.h), under the names its `llama-quantize` tool accepts.
QUANT_TYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "BF16": 32,
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q8_0": 7,
    "Q2_K": 10, "Q2_K_S": 21, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13,
    "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ1_S": 24, "IQ1_M": 31, "IQ2_XXS": 19, "IQ2_XS": 20, "IQ2_S": 28, "IQ2_M": 29,
    "IQ3_XXS": 23, "IQ3_XS": 22, "IQ3_S": 26, "IQ3_M": 27, "IQ4_NL": 25, "IQ4_XS": 30,
}

# File types whose mix puts some weights in a type llama.cpp refuses to make without an importance matrix
# (tensor_requires_imatrix in src/llama-quant.cpp: IQ1_*, IQ2_*, IQ3_XXS, and Q2_K inside a Q2_K_S file).
NEEDS_IMATRIX: frozenset[str] = frozenset(
    {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"}
)
