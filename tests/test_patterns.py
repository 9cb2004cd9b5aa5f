"""Sharing patterns against the groupings the paper spells out.

Brandon et al. 2024, "Reducing Transformer Key-Value Cache Size with Cross-Layer Attention" (arXiv 2405.12981).
"""

import pytest

from cla_jax import patterns


def groups(pattern, num_layers):
  return patterns.layer_groups(patterns.group_sizes(pattern, num_layers))


def test_cla2_pairs_adjacent_layers():
  assert groups("cla2", 20) == [[2 * i, 2 * i + 1] for i in range(10)]


def test_cla3_leftover_group_comes_first():
  # The paper's 10-layer CLA3 figure: {0} alone, then {1,2,3}, {4,5,6}, {7,8,9}.
  assert groups("cla3", 10) == [[0], [1, 2, 3], [4, 5, 6], [7, 8, 9]]
  assert len(groups("cla3", 20)) == 7


def test_cla4():
  assert groups("cla4", 20) == [list(range(4 * i, 4 * i + 4)) for i in range(5)]


def test_keep_ends():
  expected = [[0]] + [[2 * i + 1, 2 * i + 2] for i in range(9)] + [[19]]
  assert groups("keep_ends", 20) == expected


def test_dense_front():
  expected = [[i] for i in range(9)] + [list(range(9, 19))] + [[19]]
  assert groups("dense_front", 20) == expected


def test_dense_back():
  expected = [[0]] + [list(range(1, 11))] + [[i] for i in range(11, 20)]
  assert groups("dense_back", 20) == expected


def test_none_and_explicit_list():
  assert groups("none", 3) == [[0], [1], [2]]
  assert groups("1,3", 4) == [[0], [1, 2, 3]]


@pytest.mark.parametrize(
    "pattern,expected",
    [
        ("cla2", ((2, 10),)),
        ("keep_ends", ((1, 1), (2, 9), (1, 1))),
        ("cla3", ((2, 1), (3, 6))),
        ("dense_back", ((1, 1), (10, 1), (1, 9))),
    ],
)
def test_segments_run_length_encode_equal_groups(pattern, expected):
  assert patterns.segments(patterns.group_sizes(pattern, 20)) == expected


@pytest.mark.parametrize(
    "pattern,num_layers,message",
    [
        ("cla0", 4, "share factor must be positive"),
        ("1,2", 4, "covers 3 layers"),
        ("0,4", 4, "must be positive"),
        ("sandwich", 4, "unknown model.pattern"),
        ("cla2", 0, "num_layers must be positive"),
        ("keep_ends", 1, "needs num_layers >= 2"),
    ],
)
def test_impossible_patterns_name_the_field(pattern, num_layers, message):
  with pytest.raises(patterns.PatternError, match=message):
    patterns.group_sizes(pattern, num_layers)
