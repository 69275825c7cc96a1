"""The output shown in README.md and docs/*.md is what the commands print today (tools/readme_samples.py)."""

import importlib.util
import sys
import textwrap

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("readme_samples", REPO / "tools" / "readme_samples.py")
samples = importlib.util.module_from_spec(spec)
sys.modules["readme_samples"] = samples  # dataclasses look their module up while the class is built
spec.loader.exec_module(samples)


def test_every_sample_matches_a_fresh_run():
    problem = samples.environment_problem()
    if problem:
        pytest.skip(problem)
    diffs = samples.check()
    assert not diffs, "\n\n".join(diffs) + "\n\nregenerate them: python tools/readme_samples.py --write"


def test_every_known_sample_is_shown_and_every_marker_is_known():
    shown = {block.name for _, blocks in samples.all_blocks().values() for block in blocks if not block.code}
    assert shown == set(samples.SAMPLES)  # all_blocks raises on an unknown name or a marker without a block


def test_numbers_with_a_point_timings_and_versions_compare_equal_and_the_rest_does_not():
    assert samples.normalized("diff 5.36e-07 in 7.3 s, torch 2.13.0+cpu") == samples.normalized(
        "diff 3.87e-07 in 12.1 s, torch 2.11.0+cpu")
    assert samples.normalized("  rms_norm.hf   32    32     0.47  2.7  ") == [" rms_norm.hf 32 32 # #"]
    assert samples.normalized("12 patched, 4 skipped") != samples.normalized("11 patched, 4 skipped")
    assert samples.normalized("torch.float32 on cuda:0") == ["torch.float32 on cuda:0"]


def test_a_marker_needs_a_known_name_and_a_closed_block():
    def blocks(text):
        return samples.find_blocks(REPO / "README.md", textwrap.dedent(text).split("\n"))

    assert [(b.name, b.first, b.last) for b in blocks("<!-- sample: demo -->\n```text\na\nb\n```\n")] == [
        ("demo", 2, 4)]
    with pytest.raises(ValueError, match="unknown sample 'nope'"):
        blocks("<!-- sample: nope -->\n```\n```\n")
    with pytest.raises(ValueError, match="must follow"):
        blocks("<!-- sample: demo -->\ntext\n")
    with pytest.raises(ValueError, match="not closed"):
        blocks("<!-- sample: demo -->\n```\nline\n")
