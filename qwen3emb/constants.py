"""Every name and number the contract fixes, in one place (see shared/CONTRACT.md)."""

from __future__ import annotations

# --- Text models (Qwen3-Embedding) -------------------------------------------------------
END_TOKEN = "<|endoftext|>"
"""Appended by the tokenizer's post-processor; the pooled token. Also the pad token."""
END_TOKEN_ID = 151643
IM_END_TOKEN = "<|im_end|>"
"""``eos_token`` in tokenizer_config.json; never appended for embeddings."""

QUERY_TEMPLATE = "Instruct: {task}\nQuery:{query}"
"""No space after ``Query:`` (the released reference code)."""
DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"

TEXT_MRL_MIN = 32
DEFAULT_MAX_LENGTH = 8192

POOLING = "last_token"
NORMALIZATION = "l2"

# The Qwen special tokens in id order, starting at END_TOKEN_ID (151643 .. 151668).
QWEN_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
"""(content, special) pairs; the real vocabulary is 151643 BPE tokens plus these 26."""

# --- Bundle layout ----------------------------------------------------------------------
MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = "qwen3emb-bundle"
BUNDLE_FORMAT_VERSION = 1
ONNX_DIR = "onnx"
GGUF_DIR = "gguf"
FORMATS = ("onnx", "gguf")
DEFAULT_GGUF_TYPE = "f16"
REPORTS_DIR = "reports"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
"""Copied unchanged when present; ``tokenizer.json`` is required."""

# ONNX graph contract for text models.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
SENTENCE_EMBEDDING = "sentence_embedding"
DEFAULT_OPSET = 18

# --- Fidelity floors: minimum cosine to the reference over the probe set -----------------
FLOORS: dict[str, float] = {
    "fp32": 0.99999,
    "f32": 0.99999,
    "fp16": 0.999,
    "f16": 0.999,
    "bf16": 0.999,
    "int8": 0.99,
    "q8_0": 0.99,
    "int4": 0.95,
    "q4_k_m": 0.95,
    # Not in the contract: 5- and 6-bit k-quants sit between q8_0 and q4_k_m.
    "q6_k": 0.99,
    "q5_k_m": 0.98,
}

# --- Exit codes of the CLI ---------------------------------------------------------------
EXIT_OK = 0
EXIT_PARITY_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
