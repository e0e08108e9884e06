"""The torch-free job contract (facegen.contract.spec) names what training defines: they must agree."""

from facegen.contract.fields import MAX_STUDENT_STEPS
from facegen.contract.spec import DEFAULT_EDIT_GUIDANCE, DEFAULT_STEPS, LATEST, Sampler
from facegen.model.checkpoints import LATEST as CHECKPOINT_LATEST
from facegen.model.config import EDIT_GUIDANCE_SCALE, ConsistencyConfig
from facegen.model.diffusion.samplers import SAMPLERS, STUDENT_SAMPLER


def test_every_sampler_of_the_contract_is_a_training_sampler_and_back() -> None:
    assert {sampler.value for sampler in Sampler} == set(SAMPLERS)
    assert set(DEFAULT_STEPS) == set(Sampler)
    assert Sampler.student.value == STUDENT_SAMPLER


def test_the_student_bounds_repeat_the_distillations_defaults() -> None:
    assert DEFAULT_STEPS[Sampler.student] == ConsistencyConfig().default_steps
    assert MAX_STUDENT_STEPS == ConsistencyConfig().max_steps


def test_latest_names_the_same_version_on_both_sides() -> None:
    assert LATEST == CHECKPOINT_LATEST


def test_an_edit_defaults_to_the_guidance_its_evaluation_measured() -> None:
    assert DEFAULT_EDIT_GUIDANCE == EDIT_GUIDANCE_SCALE
