"""Built-in inputs that need no download: a small multilingual corpus (the demo tokenizer,
calibration texts) and synthetic images."""

from __future__ import annotations

from typing import Any

import numpy as np

CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors so that similar meanings end up close together.",
    "A retrieval system ranks passages by the cosine similarity of their embeddings.",
    "What is the capital of France? Paris is the capital and largest city of France.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The mitochondria is the powerhouse of the cell.",
    "Instruct: Given a web search query, retrieve relevant passages that answer the query",
    "Query: how do I export a model to ONNX?",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC;",
    "import numpy as np\nx = np.linspace(0, 1, 100)\n",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El rápido zorro marrón salta sobre el perro perezoso.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "敏捷的棕色狐狸跳过了懒狗。机器学习模型把文本变成向量。",
    "日本語の文章を埋め込みベクトルに変換します。東京は日本の首都です。",
    "한국어 문장도 벡터로 변환할 수 있습니다.",
    "العربية لغة جميلة ويتحدث بها الملايين.",
    "हिंदी भारत की एक प्रमुख भाषा है।",
    "Ελληνικά: η γρήγορη καφέ αλεπού.",
    "emoji: 😀 🚀 🎉 👍🏽 ❤️ 🇯🇵",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2026-11-21",
    "   leading and trailing whitespace\t\n",
    "URLs like https://example.com/path?query=1 and emails like a@b.org",
    "JSON: {\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
)


def synthetic_image(width: int, height: int, *, mode: str = "RGB", seed: int = 0) -> Any:
    """A deterministic test image: colour gradients, stripes and noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 127 + 127 * np.sin((x + 2 * y) / 5.0)
    rgb = np.stack([r, g, b], -1) + rng.normal(0, 20, (height, width, 3))
    pixels = np.clip(rgb, 0, 255).astype(np.uint8)
    if mode == "RGBA":
        alpha = np.clip(255 * x / max(width - 1, 1), 0, 255).astype(np.uint8)[..., None]
        return Image.fromarray(np.concatenate([pixels, alpha], -1), "RGBA")
    image = Image.fromarray(pixels, "RGB")
    return image.convert(mode) if mode != "RGB" else image
