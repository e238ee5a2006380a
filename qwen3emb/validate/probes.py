"""The built-in probe set: the inputs on which every artifact must match the reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qwen3emb.errors import InputError

PROBE_TEXTS: tuple[tuple[str, str], ...] = (
    ("short-en", "Hello"),
    ("sentence-en", "The quick brown fox jumps over the lazy dog."),
    ("long-en", " ".join(
        ["Embedding models map text to vectors so that nearby vectors mean similar things."] * 12)),
    ("fr", "Le renard brun rapide saute par-dessus le chien paresseux."),
    ("de", "Der schnelle braune Fuchs springt über den faulen Hund."),
    ("ru", "Быстрая коричневая лиса прыгает через ленивую собаку."),
    ("zh", "敏捷的棕色狐狸跳过了懒狗。"),
    ("ja", "東京は日本の首都です。"),
    ("ar", "العربية لغة جميلة."),
    ("hi", "हिंदी भारत की एक प्रमुख भाषा है।"),
    ("emoji", "🚀 launch day 🎉👍🏽 ❤️ 🇯🇵"),
    ("code", "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"),
    ("json", '{"key": [1, 2, 3], "nested": {"a": null}}'),
    ("whitespace", "   \t\n  "),
    ("numbers", "3.14159 2026-11-21 0x1F 1e-9"),
    ("special-token-text", "literal <|endoftext|> inside text"),
)

PAIRS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris is the capital and largest city of France."),
    ("How do plants make food?",
     "Photosynthesis converts light energy into chemical energy stored in glucose."),
    ("how to add two numbers in python", "def add(a, b):\n    return a + b"),
    ("東京はどこの首都ですか", "東京は日本の首都です。"),
    ("best way to celebrate a launch", "🚀 launch day 🎉 with the whole team"),
)
"""(query, relevant document) pairs; documents of the other pairs are distractors."""

OVERLONG_REPEAT = "over-long input that must be truncated while keeping the end token. "


@dataclass(frozen=True)
class ProbeSet:
    """Texts to embed, named, plus query/document pairs for retrieval agreement."""

    texts: tuple[tuple[str, str], ...]
    pairs: tuple[tuple[str, str], ...] = field(default=PAIRS)
    task: str | None = None

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.texts]


def build_probes(probe_max_length: int, extra_texts: list[str] | None = None) -> ProbeSet:
    """The built-in probes plus an over-long text (> ``probe_max_length`` tokens) and extras.

    The over-long text is sized by characters: every token covers at most a few characters,
    so ``4 * probe_max_length`` words always exceed the limit.
    """
    overlong = OVERLONG_REPEAT * max(4, probe_max_length // 2)
    texts = list(PROBE_TEXTS) + [("over-long", overlong)]
    for i, text in enumerate(extra_texts or []):
        texts.append((f"user-{i}", text))
    return ProbeSet(texts=tuple(texts))


def read_texts_file(path: str | Path) -> list[str]:
    """One text per line from a UTF-8 file (blank lines skipped; ``\\n`` escapes allowed).

    Raises:
        InputError: missing, unreadable or empty file.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read texts file '{p}': {e}",
                         hint="Pass a UTF-8 text file with one text per line") from e
    texts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not texts:
        raise InputError(f"texts file '{p}' has no non-blank lines",
                         hint="Put one text per line")
    return texts
