"""CompressionPlan: a small, frozen, validated, serializable description of what every unit gets."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from autocompress.plan import BIT_WIDTHS, MAX_SPARSITY, CompressionPlan, LayerCompression

BLOCK = "model.layers.0"
Q_PROJ = "model.layers.0.self_attn.q_proj"
DOWN_PROJ = "model.layers.0.mlp.down_proj"


def mixed_plan() -> CompressionPlan:
    return CompressionPlan(
        default=LayerCompression(sparsity=0.25, bits=8),
        layers={
            "model.layers.0": LayerCompression(sparsity=0.5, bits=4),
            "model.layers.1": LayerCompression(sparsity=0.0, bits=3),
        },
        pruning="magnitude",
        quantization="rtn",
        group_size=64,
        symmetric=True,
    )


# --- validation: sparsity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.5, MAX_SPARSITY])
def test_sparsity_from_zero_to_the_maximum_is_accepted(sparsity):
    assert LayerCompression(sparsity=sparsity).sparsity == sparsity


def test_the_maximum_sparsity_is_095():
    assert MAX_SPARSITY == 0.95


@pytest.mark.parametrize("sparsity", [-0.01, 0.951, 1.0])
def test_sparsity_outside_zero_to_095_is_rejected(sparsity):
    with pytest.raises(ValidationError, match="sparsity"):
        LayerCompression(sparsity=sparsity)


def test_a_plan_rejects_an_out_of_range_sparsity_in_a_named_layer():
    with pytest.raises(ValidationError, match="sparsity"):
        CompressionPlan(layers={BLOCK: {"sparsity": 0.99}})


# --- validation: bits -------------------------------------------------------------------------------------------


def test_the_allowed_bit_widths_are_2_3_4_5_6_8_16():
    assert tuple(BIT_WIDTHS) == (2, 3, 4, 5, 6, 8, 16)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8, 16])
def test_every_allowed_bit_width_is_accepted(bits):
    assert CompressionPlan.uniform(bits=bits).default.bits == bits


@pytest.mark.parametrize("bits", [0, 1, 7, 12, 32])
def test_other_bit_widths_are_rejected(bits):
    with pytest.raises(ValidationError, match="bits"):
        LayerCompression(bits=bits)


def test_the_default_unit_setting_is_the_identity():
    setting = LayerCompression()
    assert (setting.sparsity, setting.bits) == (0.0, 16)
    assert setting.is_identity
    assert not LayerCompression(bits=8).is_identity
    assert not LayerCompression(sparsity=0.1).is_identity


# --- validation: methods ----------------------------------------------------------------------------------------


def test_an_unknown_pruning_method_is_rejected_with_its_name_and_the_known_ones():
    with pytest.raises(ValidationError, match=r"unknown pruning method 'no-such-pruner'.*magnitude.*wanda"):
        CompressionPlan(pruning="no-such-pruner")


def test_an_unknown_quantization_method_is_rejected_with_its_name_and_the_known_ones():
    with pytest.raises(ValidationError, match=r"unknown quantization method 'no-such-quantizer'.*rtn"):
        CompressionPlan(quantization="no-such-quantizer")


@pytest.mark.parametrize("pruning", ["magnitude", "wanda"])
def test_the_registered_pruners_are_accepted(pruning):
    assert CompressionPlan(pruning=pruning).pruning == pruning


def test_an_unknown_field_is_rejected():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        CompressionPlan(sparsity=0.5)


# --- validation: N:M patterns -----------------------------------------------------------------------------------


def test_unstructured_is_the_default_pattern_and_has_no_n_m():
    plan = CompressionPlan()
    assert plan.pattern == "unstructured"
    assert plan.nm is None


@pytest.mark.parametrize(("pattern", "nm"), [("2:4", (2, 4)), ("1:4", (1, 4)), ("4:8", (4, 8))])
def test_an_n_m_pattern_is_parsed(pattern, nm):
    assert CompressionPlan(pattern=pattern).nm == nm


@pytest.mark.parametrize("pattern", ["4:4", "0:4", "3:2", "2-4", "2:", "a:b", ":4", "structured"])
def test_malformed_or_impossible_n_m_patterns_are_rejected(pattern):
    with pytest.raises(ValidationError, match="pattern"):
        CompressionPlan(pattern=pattern)


def test_under_2_4_a_unit_is_either_dense_or_exactly_half_sparse():
    plan = CompressionPlan(
        pattern="2:4",
        default=LayerCompression(sparsity=0.5),
        layers={BLOCK: LayerCompression(sparsity=0.0, bits=4)},
    )
    assert plan.nm == (2, 4)
    assert (plan.default.sparsity, plan.layers[BLOCK].sparsity) == (0.5, 0.0)


def test_under_1_4_the_only_sparsity_besides_zero_is_075():
    assert CompressionPlan.uniform(sparsity=0.75, pattern="1:4").default.sparsity == 0.75
    with pytest.raises(ValidationError, match=r"must be 0 or 0\.75"):
        CompressionPlan.uniform(sparsity=0.5, pattern="1:4")


def test_a_sparsity_the_n_m_pattern_cannot_give_is_rejected_and_the_unit_is_named():
    with pytest.raises(ValidationError, match=r"pattern 2:4.*model\.layers\.0.*must be 0 or 0\.5, got 0\.3"):
        CompressionPlan(pattern="2:4", layers={BLOCK: LayerCompression(sparsity=0.3)})


# --- validation: group size -------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [-1, 1, 32, 128, 576])
def test_a_positive_group_size_or_minus_one_is_accepted(group_size):
    assert CompressionPlan(group_size=group_size).group_size == group_size


@pytest.mark.parametrize("group_size", [0, -2, -128])
def test_zero_and_other_negative_group_sizes_are_rejected(group_size):
    with pytest.raises(ValidationError, match="group_size"):
        CompressionPlan(group_size=group_size)


# --- frozen -----------------------------------------------------------------------------------------------------


def test_a_plan_is_frozen():
    plan = CompressionPlan.uniform(sparsity=0.5)
    with pytest.raises(ValidationError, match="frozen"):
        plan.pruning = "magnitude"
    assert plan.pruning == "wanda"


def test_a_unit_setting_is_frozen():
    setting = LayerCompression(sparsity=0.5, bits=4)
    with pytest.raises(ValidationError, match="frozen"):
        setting.bits = 8
    assert setting.bits == 4


def test_changing_a_plan_makes_a_copy_and_leaves_the_original_alone():
    plan = CompressionPlan.uniform(sparsity=0.5)
    changed = plan.model_copy(update={"pruning": "magnitude"})
    assert (plan.pruning, changed.pruning) == ("wanda", "magnitude")


# --- JSON -------------------------------------------------------------------------------------------------------


def test_a_plan_round_trips_through_json():
    plan = mixed_plan()
    assert CompressionPlan.from_json(plan.to_json()) == plan


def test_an_n_m_per_row_plan_round_trips_through_json():
    plan = CompressionPlan(
        pattern="2:4",
        granularity="linear",
        default=LayerCompression(sparsity=0.5, bits=4),
        layers={Q_PROJ: LayerCompression(bits=16)},
        group_size=-1,
    )
    assert CompressionPlan.from_json(plan.to_json()) == plan


def test_the_json_form_is_plain_json_with_every_field():
    data = json.loads(mixed_plan().to_json())
    assert data["default"] == {"sparsity": 0.25, "bits": 8}
    assert data["layers"]["model.layers.0"] == {"sparsity": 0.5, "bits": 4}
    assert data["pruning"] == "magnitude"
    assert data["group_size"] == 64
    assert data["symmetric"] is True
    assert data["granularity"] == "block"


def test_invalid_json_content_is_rejected_on_reading():
    text = json.dumps({"default": {"sparsity": 0.5, "bits": 7}})
    with pytest.raises(ValidationError, match="bits"):
        CompressionPlan.from_json(text)


# --- trial parameters -------------------------------------------------------------------------------------------


def test_to_params_gives_one_sparsity_and_one_bits_entry_per_named_unit():
    assert mixed_plan().to_params() == {
        "model.layers.0.sparsity": 0.5,
        "model.layers.0.bits": 4,
        "model.layers.1.sparsity": 0.0,
        "model.layers.1.bits": 3,
    }


def test_a_plan_round_trips_through_trial_parameters_given_its_plan_wide_options():
    plan = mixed_plan()
    options = plan.model_dump(exclude={"layers"})
    options["default"] = plan.default
    assert CompressionPlan.from_params(plan.to_params(), **options) == plan


def test_from_params_fills_a_missing_field_of_a_unit_with_its_default():
    plan = CompressionPlan.from_params({"model.layers.2.sparsity": 0.4})
    assert plan.layers == {"model.layers.2": LayerCompression(sparsity=0.4, bits=16)}


def test_from_params_validates_the_values():
    with pytest.raises(ValidationError, match="bits"):
        CompressionPlan.from_params({"model.layers.0.bits": 7})


@pytest.mark.parametrize("key", ["model.layers.0.size", "sparsity", "model.layers.0"])
def test_from_params_rejects_a_key_that_is_not_unit_dot_field(key):
    with pytest.raises(ValueError, match="not of the form"):
        CompressionPlan.from_params({key: 0.5})


# --- uniform, setting, check_units ------------------------------------------------------------------------------


def test_uniform_sets_the_default_for_every_unit_and_names_none():
    plan = CompressionPlan.uniform(sparsity=0.5, bits=4, pruning="magnitude", group_size=32)
    assert plan.default == LayerCompression(sparsity=0.5, bits=4)
    assert plan.layers == {}
    assert (plan.pruning, plan.group_size) == ("magnitude", 32)


def test_uniform_with_no_arguments_is_the_identity_plan():
    assert CompressionPlan.uniform().default.is_identity


def test_at_block_granularity_a_linear_gets_the_setting_of_its_block():
    plan = CompressionPlan(layers={BLOCK: LayerCompression(bits=4)})
    assert plan.setting(Q_PROJ, BLOCK) == LayerCompression(bits=4)
    assert plan.setting(DOWN_PROJ, BLOCK) == LayerCompression(bits=4)
    assert plan.setting("model.layers.1.mlp.down_proj", "model.layers.1") == plan.default


def test_at_linear_granularity_a_linear_gets_its_own_setting():
    plan = CompressionPlan(
        granularity="linear",
        default=LayerCompression(bits=8),
        layers={Q_PROJ: LayerCompression(sparsity=0.5)},
    )
    assert plan.setting(Q_PROJ, BLOCK) == LayerCompression(sparsity=0.5)
    assert plan.setting(DOWN_PROJ, BLOCK) == LayerCompression(bits=8)


def test_at_linear_granularity_a_block_name_is_not_a_unit():
    plan = CompressionPlan(granularity="linear", layers={BLOCK: LayerCompression(bits=4)})
    assert plan.setting(Q_PROJ, BLOCK) == LayerCompression()


def test_check_units_accepts_a_plan_that_names_only_known_units():
    CompressionPlan(layers={BLOCK: LayerCompression(bits=4)}).check_units([BLOCK, "model.layers.1"])


def test_check_units_rejects_a_plan_that_names_a_unit_the_model_does_not_have():
    plan = CompressionPlan(layers={BLOCK: LayerCompression(bits=4), "model.layers.9": LayerCompression(bits=4)})
    with pytest.raises(ValueError, match=r"1 block unit.*'model\.layers\.9'"):
        plan.check_units([BLOCK, "model.layers.1"])
