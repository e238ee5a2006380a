"""``python -m qwen3emb.cli``: the same as the ``qwen3emb-export`` command."""

from qwen3emb.cli import main

main()
