#!/usr/bin/env bash
# Install the tools that tests/test_interop.py loads our bundles with, beside the project's
# environment (docs/interop.md):
#   $QWEN3EMB_CONSUMERS/st-venv  sentence-transformers[onnx] + fastembed: optimum-onnx pins
#                                transformers < 4.58 and fastembed huggingface-hub < 2, which
#                                the project's own environment (transformers 5) cannot take.
#   $QWEN3EMB_CONSUMERS/node     @huggingface/transformers for Node (transformers.js).
# Default QWEN3EMB_CONSUMERS: ~/.cache/qwen3emb-consumers. Idempotent: a finished environment
# is marked with a .ok file and kept. The tests skip a tool whose environment is not there.
set -euo pipefail
root="${QWEN3EMB_CONSUMERS:-$HOME/.cache/qwen3emb-consumers}"
mkdir -p "$root"
export PIP_DISABLE_PIP_VERSION_CHECK=1

st="$root/st-venv"
if [ ! -f "$st/.ok" ]; then
    rm -rf "$st"
    python3 -m venv "$st"
    # The CPU torch first, so pip does not pull the CUDA build for sentence-transformers.
    "$st/bin/python" -m pip install -q torch==2.13.0
    "$st/bin/python" -m pip install -q 'sentence-transformers[onnx]==5.7.0' 'fastembed==0.9.1'
    touch "$st/.ok"
fi

node_dir="$root/node"
if [ ! -f "$node_dir/.ok" ]; then
    if command -v npm >/dev/null; then
        rm -rf "$node_dir" && mkdir -p "$node_dir"
        echo '{"private": true}' > "$node_dir/package.json"
        # onnxruntime-node's install script downloads extra (GPU) binaries from a host outside
        # the npm registry; the CPU binaries ship inside the package.
        (cd "$node_dir" && ONNXRUNTIME_NODE_INSTALL=skip ONNXRUNTIME_NODE_INSTALL_CUDA=skip \
            npm install --no-audit --no-fund --silent @huggingface/transformers@4.3.2)
        touch "$node_dir/.ok"
    else
        echo "npm not found: the transformers.js test will skip" >&2
    fi
fi
echo "consumer environments ready in $root"
