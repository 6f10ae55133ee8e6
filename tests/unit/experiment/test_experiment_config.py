"""dept-experiment presets: the budget every variant gets, and refusals of inconsistent settings."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dept_experiment.cli import main
from dept_experiment.config import PRESETS, VARIANTS, preset
from dept_experiment.evaluation import udhr_language
from dept_model.data import list_sources, load_texts


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_name_real_sources_and_give_std_the_dept_runs_total(name) -> None:
    cfg = preset(name)
    assert cfg.variants == VARIANTS
    assert cfg.std_steps == len(cfg.sources) * cfg.rounds * cfg.inner_steps
    assert cfg.tokens_per_source == cfg.rounds * cfg.inner_steps * cfg.batch_size * cfg.seq_len
    embedded = set(list_sources())
    assert set(cfg.sources) <= embedded and set(cfg.heldout) <= embedded
    assert not set(cfg.sources) & set(cfg.heldout)
    for text in cfg.udhr:
        assert load_texts(text, "test")  # a real UDHR text
    assert cfg.source_vocab_size < cfg.vocab_size  # SPEC-OPT's own vocabularies are the smaller ones


def test_udhr_languages_map_to_training_sources() -> None:
    assert udhr_language("udhr_en") == "en"
    assert udhr_language("udhr_ur") == "ur_ui"


def test_bad_settings_are_refused() -> None:
    cfg = preset("smoke")
    with pytest.raises(ValueError, match="held-out"):
        cfg.replace(heldout=("sw",))
    with pytest.raises(ValueError, match="variants"):
        cfg.replace(variants=("std", "diloco"))
    with pytest.raises(ValueError, match="rounds"):
        cfg.replace(rounds=0)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpu-huge")


def test_cli_refuses_an_inconsistent_override_before_training(tmp_path) -> None:
    result = CliRunner().invoke(main, ["--preset", "smoke", "--heldout", "sw", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "held-out sources must not be trained on" in result.output
    assert not any(tmp_path.iterdir())
