"""Error formatting: one line, message then fix; exit codes by kind."""

from __future__ import annotations

import pytest

from qwen3emb.errors import (
    BundleError,
    InputError,
    MissingDependencyError,
    ParityError,
    ProviderError,
    require,
)


def test_one_line_joins_message_and_hint() -> None:
    err = InputError("dimensions=8 is outside 32..64.", hint="Choose a value from 32 to 64")
    assert err.one_line() == "dimensions=8 is outside 32..64. Choose a value from 32 to 64"
    assert "\n" not in err.one_line()


def test_one_line_without_hint_is_the_message() -> None:
    assert BundleError("broken").one_line() == "broken"


@pytest.mark.parametrize("cls, code", [(InputError, 2), (BundleError, 2), (ProviderError, 2),
                                       (MissingDependencyError, 2), (ParityError, 1)])
def test_exit_codes(cls: type, code: int) -> None:
    assert cls("x").exit_code == code


def test_missing_dependency_names_the_extra() -> None:
    with pytest.raises(MissingDependencyError) as info:
        require("surely_not_a_module_qwen3emb", extra="gguf")
    assert "pip install 'qwen3emb-export[gguf]'" in info.value.one_line()
