"""conftest.covering_subset, which picks the cases the Triton interpreter runs of an `interpreted_cover` test: every
value (strength 1) or every pair of two parameters' values (strength 2) of the full matrix appears in a chosen case,
and far fewer cases are chosen than the matrix holds."""

import itertools

import pytest
from conftest import covering_subset


def matrix(**values) -> list[dict]:
    """Every combination of the parameters' values, as the stacked parametrize decorators make them."""
    return [dict(zip(values, combination)) for combination in itertools.product(*values.values())]


def combinations_in(cases: list[dict], strength: int) -> set:
    return {tuple((name, case[name]) for name in names) for case in cases
            for names in itertools.combinations(sorted(case), strength)}


@pytest.mark.parametrize("sizes, strength, expected", [
    ((2, 3, 9), 2, 27),  # linear cross-entropy: dtype x reduction x options; at least 3 x 9 cases
    ((3, 3, 6), 2, 18),  # cross-entropy
    ((3, 10), 1, 10),  # Adam: dtype x options, each value once
    ((3, 10), 2, 30),  # every pair of two parameters is the whole matrix
    ((5,), 2, 5),  # one parameter: each of its values
])
def test_every_combination_is_covered_by_few_cases(sizes, strength, expected):
    cases = matrix(**{f"p{i}": [f"v{j}" for j in range(size)] for i, size in enumerate(sizes)})
    chosen = covering_subset(cases, strength)
    assert len(chosen) == expected
    picked = [cases[i] for i in sorted(chosen)]
    for k in range(1, strength + 1):
        assert combinations_in(picked, k) == combinations_in(cases, k)


def test_values_that_are_not_hashable_are_told_apart_by_their_repr():
    cases = matrix(options=[{"a": 1}, {"a": 2}, {}], dtype=["fp32", "bf16"])
    chosen = covering_subset(cases, 1)
    assert len(chosen) == 3
    assert sorted(repr(cases[i]["options"]) for i in chosen) == sorted(["{'a': 1}", "{'a': 2}", "{}"])
