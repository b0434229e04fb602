"""The --where language (ray_galaxy.generation.where): what it selects, and everything it refuses."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_galaxy.generation.properties import PROPERTY_NAMES, MIN_MATCHES, selected_images
from ray_galaxy.generation.where import MAX_WHERE_CHARS, WhereError, where_mask

NAN = float("nan")
COLUMNS = {
    "r50_px": np.array([2.0, 5.0, 6.0, 9.0, NAN]),
    "ellipticity": np.array([0.7, 0.6, 0.2, 0.9, 0.8]),
    "m20": np.array([-2.1, -1.5, -1.0, -2.5, -1.9]),
}


@pytest.mark.parametrize("text,rows", [
    ("r50_px >= 6 and ellipticity > 0.5", [3]),
    ("r50_px >= 6", [2, 3]),
    ("2 < r50_px < 9", [1, 2]),                        # chained: both bounds
    ("r50_px < 3 or r50_px > 8", [0, 3]),
    ("r50_px > 5 or ellipticity > 0.65 and m20 < -2", [0, 2, 3]),  # and binds tighter than or
    ("(r50_px > 5 or ellipticity > 0.65) and m20 < -2", [0, 3]),   # parentheses group
    ("m20 <= -2.1", [0, 3]),                           # a negative number
    ("r50_px == 5", [1]),
    ("r50_px != 5", [0, 2, 3]),                        # NaN (not measured) satisfies no condition, not even !=
    ("ellipticity > 0.75", [3, 4]),                    # galaxy 4 has an ellipticity though no size
    ("  r50_px>=6  ", [2, 3]),
    ("r50_px > 1e-3 and r50_px < 1E1", [0, 1, 2, 3]),
])
def test_selects_the_rows_that_satisfy_it(text, rows):
    assert np.flatnonzero(where_mask(text, COLUMNS)).tolist() == rows


@pytest.mark.parametrize("text,problem", [
    ("__import__('os').system('x')", "(a function call) is not allowed"),
    ("r50_px.__class__", "(an attribute) is not allowed"),
    ("r50_px > ().__class__.__bases__[0]", "is not allowed"),
    ("1 if 1 else 2", "(a conditional expression) is not allowed"),
    ("[x for x in ()]", "(a comprehension) is not allowed"),
    ("r50_px > 'a'", "'a' is not a number"),
    ("r50_px > b'a'", "is not a number"),
    ("r50_px > None", "None is not a number"),
    ("r50_px > True", "True is not a number"),
    ("r50_px > 1j", "1j is not a number"),
    ("unknown > 1", "unknown property 'unknown'"),
    ("__builtins__ > 1", "unknown property '__builtins__'"),
    ("r50_px >> 1", "(the operator >>) is not allowed"),
    ("r50_px > 1 + 1", "(the operator +) is not allowed"),
    ("-r50_px < 1", "(arithmetic) is not allowed"),
    ("lambda: 1", "(a lambda) is not allowed"),
    ("r50_px > (lambda: 1)()", "(a function call) is not allowed"),
    ("(r50_px := 1) > 0", "(an assignment) is not allowed"),
    ("r50_px > f'{1}'", "(a string) is not allowed"),
    ("not r50_px > 1", "(not) is not allowed"),
    ("r50_px in (1, 2)", "a comparison other than"),
    ("r50_px is 1", "a comparison other than"),
    ("r50_px", "alone is not a condition"),
    ("1 < 2", "does not compare a property with a number"),
    ("r50_px < m20", "does not compare a property with a number"),
    ("r50_px > 1e999", "1e999 is not a finite number"),
    ("r50_px > 1; import os", "not an expression"),
    ("r50_px > 1\nimport os", "not an expression"),
    ("r50_px > 1\x00", "not an expression"),
    ("r50_px > ", "not an expression"),
    ("", "it is empty"),
    ("x" * 10_000, f"10000 characters, more than the {MAX_WHERE_CHARS} allowed"),
    ("r50_px > " + "-" * 480 + "1", "nested too deeply"),
    ("r50_px > " + "9" * 400, "is not a finite number"),
])
def test_refuses_anything_but_comparisons_of_known_names_with_numbers(text, problem):
    with pytest.raises(WhereError) as e:
        where_mask(text, COLUMNS)
    message = str(e.value)
    assert problem in message, message
    assert "\n" not in message and len(message) < 400  # one line, also for 10k characters of input
    assert message.endswith("known properties: r50_px, ellipticity, m20")


def test_too_few_matching_galaxies_say_how_many_match():
    columns = {name: np.arange(48, dtype=float) for name in PROPERTY_NAMES}
    assert selected_images(f"r50_px >= {48 - MIN_MATCHES}", columns).sum() == MIN_MATCHES
    with pytest.raises(WhereError, match=r"19 of the 48 training galaxies match \(152 kernels\), fewer than the 20"):
        selected_images(f"r50_px > {48 - MIN_MATCHES}", columns, kernels_per_galaxy=8)
    odd = np.arange(48) % 2 == 1
    with pytest.raises(WhereError, match=r"12 of the 24 training galaxies of class 'b' match"):
        selected_images("r50_px >= 24", columns, odd, " of class 'b'")


TOKENS = ["r50_px", "m20", "ellipticity", "and", "or", "not", "(", ")", "<", "<=", "==", "!=", ">", "-", "1", "2.5",
          "1e999", "'a'", ".", "__class__", "[", "]", ",", "lambda", ":", "if", "else", "x", "**", "+", " "]


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(text=st.text(max_size=60) | st.lists(st.sampled_from(TOKENS), max_size=12).map(" ".join))
def test_any_input_is_a_selection_or_a_where_error(text):
    """Random text and random token soup: a boolean row mask or a WhereError, nothing else."""
    try:
        mask = where_mask(text, COLUMNS)
    except WhereError as e:
        assert "known properties: r50_px, ellipticity, m20" in str(e)
        return
    assert mask.dtype == bool and mask.shape == (5,)
