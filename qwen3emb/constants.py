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
VL_MAX_LENGTH = 8192
"""Qwen3-VL-Embedding's reference truncation; text bundles default to the checkpoint's
max_position_embeddings."""

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
EXTERNAL_DATA_SUFFIX = "_data"
"""``model.onnx`` keeps weights above 1 GiB in ``model.onnx_data``: the name transformers.js
and TEI fetch from the Hub (onnxruntime itself reads whatever name the graph records)."""
MODEL_CARD_FILE = "README.md"
"""The Hub model card written into every bundle (docs/interop.md)."""
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
LAST_HIDDEN_STATE = "last_hidden_state"
"""Second output of text graphs: ``sentence_embedding`` repeated at every position
[batch, sequence, dim], for loaders that read only this name and pool it themselves
(optimum / sentence-transformers' ONNX backend, transformers.js): any pooling of a constant
row, then L2, gives the embedding back (docs/interop.md)."""
DEFAULT_OPSET = 18
"""At opset 23 the exporter writes attention as one ONNX ``Attention`` node (boolean mask, K/V
repeated for GQA; left and right padding pass parity, tests/test_export.py), but onnxruntime
1.31's CPU kernel for it measured no faster than the decomposed graph (0.6B shape, 8x128,
interleaved with torch under load: torch/ONNX fp32 1.39 at opset 18 vs 1.35 at 23, int8 3.66
vs 3.93 and 3.93 vs 4.06, int4 1.97 vs 2.07: within run-to-run noise), and it needs
onnxruntime >= 1.23. ``--opset 23`` stays available."""

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

# --- Rerankers (Qwen3-Reranker, Qwen3-VL-Reranker) --------------------------------------
TASKS = ("embed", "rerank")
"""What a bundle computes; ``export --task``, else ``rerank`` when the model's name contains
``reranker`` (config and weights of the two are indistinguishable)."""
RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n")
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
RERANK_TEMPLATE = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
RERANK_INSTRUCTION = DEFAULT_TASK
"""The model card's default instruction (the embedder's default task)."""
RERANK_YES, RERANK_NO = "yes", "no"
"""The tokens whose LM-head rows make the score (ids read from the tokenizer)."""
RERANK_MAX_LENGTH = 8192
"""The model card's max_length (prefix and suffix included)."""
SCORE = "score"
"""Reranker output [batch]: sigmoid(logit_yes - logit_no) at the last real token."""
LOGITS = "logits"
"""Reranker output [batch, 1]: logit_yes - logit_no (for tools that apply their own sigmoid)."""
SCORE_FLOORS: dict[str, float] = {
    "fp32": 1e-4, "fp16": 5e-3, "int8": 0.02, "int4": 0.05,
    # GGUF types on llama.cpp: its f32 keeps the KV cache in f16, hence 1e-3; the quantized
    # types sit with their ONNX counterparts (q6_k/q5_k_m between q8_0 and q4_k_m).
    "f32": 1e-3, "f16": 5e-3, "bf16": 5e-3, "q8_0": 0.02, "q6_k": 0.02, "q5_k_m": 0.03,
    "q4_k_m": 0.05,
}
"""Largest |score - reference score| over the validator's reranker probes, per precision."""
VL_RERANK_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".')
"""Qwen3-VL-Reranker's system message (``Qwen3VLReranker.format_mm_instruction``)."""
VL_RERANK_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
"""Qwen3-VL-Reranker's default instruction (used as is: no period is appended; an empty one
falls back to it)."""
VL_RERANK_QUERY_PREFIX = "<Query>:"
VL_RERANK_DOCUMENT_PREFIX = "\n<Document>:"
VL_RERANK_MAX_LENGTH = 10240
"""The released reranker's ``max_length``: the prompt before its last
:data:`VL_RERANK_TAIL_TOKENS` tokens is cut to this many, special tokens always kept."""
VL_RERANK_TAIL_TOKENS = 5
"""``<|im_end|>``, ``\n``, ``<|im_start|>``, ``assistant``, ``\n``: never cut."""

# --- Exit codes of the CLI ---------------------------------------------------------------
EXIT_OK = 0
EXIT_PARITY_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# --- Multimodal models (Qwen3-VL-Embedding) ----------------------------------------------
VL_DEFAULT_INSTRUCTION = "Represent the user's input."
"""Goes in the system message; a period is appended when it does not end in punctuation."""
VL_EMPTY_TEXT = "NULL"
"""An item with no text, image or video is embedded as this text (the released code)."""
VL_ASSISTANT_PROMPT = "<|im_start|>assistant\n"
"""The prompt ends here (add_generation_prompt=True); its final newline is the pooled token."""
VL_MRL_MIN = 64
VL_MAX_LENGTH = 8192

IMAGE_PAD_TOKEN = "<|image_pad|>"
VIDEO_PAD_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
IM_START_TOKEN = "<|im_start|>"

# Image preprocessing (qwen-vl-utils as called by the released embedder: factor 32).
VL_PATCH_SIZE = 16
VL_MERGE_SIZE = 2
VL_TEMPORAL_PATCH_SIZE = 2
VL_IMAGE_FACTOR = VL_PATCH_SIZE * VL_MERGE_SIZE
VL_MIN_PIXELS = 4 * VL_IMAGE_FACTOR * VL_IMAGE_FACTOR  # 4096
VL_MAX_PIXELS = 1800 * VL_IMAGE_FACTOR * VL_IMAGE_FACTOR  # 1843200
VL_MAX_ASPECT_RATIO = 200
VL_IMAGE_MEAN = (0.5, 0.5, 0.5)
VL_IMAGE_STD = (0.5, 0.5, 0.5)

# Video sampling and frame size.
VL_FPS = 1.0
VL_MAX_FRAMES = 64
VL_MIN_FRAMES = 4
"""qwen-vl-utils FPS_MIN_FRAMES: short videos still get 4 frames (when they have them)."""
VL_FRAME_FACTOR = 2
VL_VIDEO_MIN_PIXELS = 128 * VL_IMAGE_FACTOR * VL_IMAGE_FACTOR  # 131072
VL_VIDEO_MAX_PIXELS = 768 * VL_IMAGE_FACTOR * VL_IMAGE_FACTOR  # 786432
VL_VIDEO_TOTAL_PIXELS = 10 * VL_VIDEO_MAX_PIXELS
"""All frames of one video together; the per-frame budget is total / frames * 2."""
VL_TIMESTAMP_FORMAT = "<{t:.1f} seconds>"

# Hard safety bounds (not reference behaviour: inputs beyond these are refused).
VL_MAX_SOURCE_PIXELS = 178_956_970
"""Pillow's own decompression-bomb limit (2x its warning threshold)."""
VL_MAX_VIDEO_SECONDS = 4 * 3600
VL_MAX_VIDEO_BYTES = 4 << 30

# ONNX graph contract for multimodal bundles.
PIXEL_PATCHES = "pixel_patches"
POS_EMBED_INDICES = "pos_embed_indices"
POS_EMBED_WEIGHTS = "pos_embed_weights"
VISION_POSITION_IDS = "vision_position_ids"
VISUAL_EMBEDS = "visual_embeds"
DEEPSTACK_EMBEDS = "deepstack_embeds"
MROPE_POSITION_IDS = "position_ids"
