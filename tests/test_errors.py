"""``first_line``: the one-line form of a library exception used in every user-facing error."""

import pytest

from diffmic.errors import first_line


@pytest.mark.parametrize(
    ("exc", "typed", "expected"),
    [
        (KeyError("x"), True, "KeyError: 'x'"),
        (RuntimeError("  size mismatch\n  for layer.weight: copying a param"), True, "RuntimeError: size mismatch"),
        (RuntimeError("size mismatch\nmore"), False, "size mismatch"),
        (ValueError(""), True, "ValueError"),
        (ValueError("   \n  "), False, ""),
    ],
)
def test_first_line(exc, typed, expected):
    assert first_line(exc, typed=typed) == expected


def test_first_line_cuts_at_limit():
    assert first_line(OSError("a" * 500), 10) == "OSError: " + "a" * 10
    assert first_line(OSError("abcdef"), 3, typed=False) == "abc"
