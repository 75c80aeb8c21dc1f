"""--model values: globs, duplicates, things that are no model."""

from __future__ import annotations

import pytest

from megatron_rl.errors import CheckpointError, UserError
from megatron_rl.eval.models import expand_models, hf_dir_for


def test_globs_expand_sorted_and_duplicates_drop(tmp_path):
    for name in ("step_00000020", "step_00000010", "other"):
        (tmp_path / name).mkdir()
    got = expand_models([str(tmp_path / "step_*"), str(tmp_path / "step_00000010"), str(tmp_path / "other")])
    assert got == [str(tmp_path / "step_00000010"), str(tmp_path / "step_00000020"), str(tmp_path / "other")]
    with pytest.raises(UserError, match="matches no file"):
        expand_models([str(tmp_path / "nothing_*")])


def test_an_hf_dir_is_served_as_is_and_a_plain_dir_is_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert hf_dir_for(str(tmp_path / "hf"), tmp_path / "out") == tmp_path / "hf"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        hf_dir_for(str(tmp_path / "empty"), tmp_path / "out")
    with pytest.raises(UserError, match="no such directory"):
        hf_dir_for(str(tmp_path / "gone"), tmp_path / "out")
