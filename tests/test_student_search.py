"""Students in the search: a student section in the YAML, joint plans (distil → prune → quantize) with honest
sizes, students on the frontier with their architecture, weak students stopped early, and students exported."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml
from optuna.trial import TrialState, create_trial

from autocompress.cli import main
from autocompress.config import Config, DistillationConfig, load_config
from autocompress.errors import UserError
from autocompress.models import compressible_linears, unit_names
from autocompress.plan import CompressionPlan, LayerCompression, StudentArchitecture
from autocompress.record import StudyRecord, TrialRecord, trial_records
from autocompress.search import StudyLocation, run_search
from autocompress.search.objective import Objective, student_pruning
from autocompress.search.space import SearchSpace
from autocompress.search.study import open_study
from autocompress.session import CompressionSession
from autocompress.size import HALF_BYTES, linear_bytes
from autocompress.targets.artifact import load
from tests.conftest import random_text

FAST_DISTILLATION = {"steps": 4, "report_every": 2, "learning_rate": 1e-3, "startup_trials": 1, "batch_size": 4}


def tiny_config(model_dir: Path, corpus: Path, **search: object) -> dict:
    """The tiny 2-block teacher (intermediate 128, 4 heads over 2 key/value heads) and a student search."""
    pools = {"seq_len": 32, "calibration": 8, "fitness": 4, "heldout": 4}
    return {
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {"source": "files", "files": [str(corpus)], **pools},
        "compression": {"pruning": "wanda", "quantization": "rtn", "group_size": 32},
        "search": {
            "sparsity": [0.0],
            "bits": [16],
            "n_trials": 4,
            "seed": 0,
            "student": {"num_layers": [1, 2], "intermediate_size": [64, 128], "distillation": FAST_DISTILLATION},
        }
        | search,
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("students-data") / "corpus.txt"
    path.write_text(random_text(6000, seed=1))
    return path


@pytest.fixture(scope="module")
def session(tiny_model_dir: Path, corpus: Path) -> CompressionSession:
    return CompressionSession(Config.model_validate(tiny_config(tiny_model_dir, corpus)))


# --- the YAML ---------------------------------------------------------------------------------------------------


def test_each_student_dimension_is_a_list_or_a_range_with_a_step() -> None:
    search = Config.model_validate(
        {"search": {"student": {"num_layers": {"low": 12, "high": 24, "step": 4}, "intermediate_size": [1024, 768]}}}
    ).search
    assert search.student.dimensions() == {"num_layers": [12, 16, 20, 24], "intermediate_size": [768, 1024]}


def test_a_token_budget_sets_the_number_of_distillation_steps() -> None:
    assert DistillationConfig(tokens=64 * 1024, batch_size=8).step_count(seq_len=128) == 64


@pytest.mark.parametrize(
    ("student", "message"),
    [
        ({}, "search.student: a student section needs at least one of num_layers"),
        ({"num_layers": {"low": 8, "high": 4, "step": 2}}, "range 8..4 is not a whole number of steps of 2"),
        ({"num_layers": [0, 4]}, "student num_layers values must be positive"),
        ({"num_layers": [4], "distillation": {"steps": 10, "tokens": 1000}}, "as steps or as tokens, not both"),
        (
            {"num_layers": [4], "distillation": {"pruner": "asha"}},
            "search.student.distillation.pruner: Input should be 'median', 'halving', 'hyperband' or 'none'",
        ),
        ({"num_layers": [4], "recovery": 5}, "search.student.recovery: Extra inputs are not permitted"),
    ],
)
def test_a_bad_student_section_is_one_line_naming_it(tmp_path: Path, student: dict, message: str) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"search": {"student": student}}))
    with pytest.raises(UserError, match=message) as raised:
        load_config(path)
    assert "\n" not in str(raised.value)


def test_a_bad_student_section_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"search": {"budget": {"sparsity": 0.5}, "sparsity": [0.4, 0.5, 0.6],
                                               "student": {"num_layers": [4]}}}))  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        main(["search", str(path), "--results", str(tmp_path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert "a budget search keeps the teacher's shape" in err


def test_a_student_larger_than_the_teacher_is_refused_before_any_trial(tmp_path, tiny_model_dir, corpus) -> None:
    config = Config.model_validate(tiny_config(tiny_model_dir, corpus, student={"num_layers": [1, 3]}))
    with pytest.raises(UserError, match=r"search\.student: student num_layers 3 exceeds the teacher's 2"):
        run_search(config, StudyLocation.resolve("too-deep", tmp_path), progress=False)


# --- joint plans ------------------------------------------------------------------------------------------------


def test_a_student_plan_round_trips_through_json_and_trial_parameters() -> None:
    plan = CompressionPlan(
        student=StudentArchitecture(num_layers=1, intermediate_size=64),
        layers={"model.layers.0": LayerCompression(sparsity=0.5, bits=4)},
        recovery_steps=3,
    )
    assert CompressionPlan.from_json(plan.to_json()) == plan
    params = plan.to_params()
    assert params == {
        "student.num_layers": 1,
        "student.intermediate_size": 64,
        "model.layers.0.sparsity": 0.5,
        "model.layers.0.bits": 4,
    }
    assert CompressionPlan.from_params(params, recovery_steps=3) == plan


def test_apply_plan_refuses_a_student_plan_it_would_apply_to_the_teacher(tiny_model) -> None:
    from autocompress.compress import apply_plan

    with pytest.raises(UserError, match="a student plan builds a new model"):
        apply_plan(tiny_model, CompressionPlan(student=StudentArchitecture(num_layers=1)), {})


def honest_bytes(model, plan: CompressionPlan) -> int:
    """Size as size.py defines it, counted here from the model's own tensors: tied embeddings once, norms in 16
    bits, each Linear at its plan's setting."""
    linears = compressible_linears(model)
    linear_total = sum(
        linear_bytes(*linear.module.weight.shape, plan.setting(linear.name, linear.block), plan) for linear in linears
    )
    in_linears = {id(linear.module.weight) for linear in linears}
    others = sum(parameter.numel() for parameter in model.parameters() if id(parameter) not in in_linears)
    return linear_total + others * HALF_BYTES


def test_a_joint_plan_pays_for_fewer_layers_then_sparsity_then_bits(session: CompressionSession) -> None:
    student = StudentArchitecture(num_layers=1)
    depth = CompressionPlan(student=student)
    pruned = depth.model_copy(update={"default": LayerCompression(sparsity=0.5)})
    joint = depth.model_copy(update={"default": LayerCompression(sparsity=0.5, bits=4)})
    sizes = [session.measure(plan).size for plan in (CompressionPlan(), depth, pruned, joint)]

    assert [size.dense_bytes for size in sizes] == [session.dense_bytes] * 4  # fractions of the teacher
    totals = [size.total_bytes for size in sizes]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    trained = session.realize(joint)
    assert trained.model.config.num_hidden_layers == 1
    assert sizes[-1].total_bytes == honest_bytes(trained.model, joint)


def test_a_recovered_student_keeps_its_masks_and_lies_on_its_grid(session: CompressionSession) -> None:
    plan = CompressionPlan(
        student=StudentArchitecture(num_layers=1),
        default=LayerCompression(sparsity=0.5, bits=4),
        group_size=32,
        recovery_steps=3,
    )
    trained = session.realize(plan)
    for name, compressed in trained.compressed.items():
        weight = trained.model.get_submodule(name).weight
        assert torch.all(weight[~compressed.mask] == 0)
        torch.testing.assert_close(weight, (compressed.quantized.dequantize() * compressed.mask).to(weight.dtype))


def test_a_joint_student_plan_exports_an_artifact_of_its_accounted_size_that_loads(session, tmp_path) -> None:
    from autocompress.students import without_training
    from autocompress.targets.artifact import export_compressed

    plan = CompressionPlan(student=StudentArchitecture(num_layers=1), default=LayerCompression(sparsity=0.5, bits=4))
    trained = session.realize(plan)
    path = export_compressed(trained.model, session.tokenizer, plan, trained.compressed, tmp_path / "artifact")
    accounted = session.measure(plan).size.total_bytes
    weights = (path / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(weights[:8], "little")  # safetensors: a length, a JSON header, then the tensors
    assert len(weights) - header == accounted
    loaded, _ = load(path)
    assert loaded.config.num_hidden_layers == 1
    batch = session.pools.heldout[:2]
    torch.testing.assert_close(loaded(batch).logits, trained.model(batch).logits, atol=1e-3, rtol=1e-3)
    assert without_training(plan).student is None


# --- the search -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student_study(tmp_path_factory, tiny_model_dir: Path, corpus: Path):
    out = tmp_path_factory.mktemp("student-study")
    config = Config.model_validate(tiny_config(tiny_model_dir, corpus))
    location = StudyLocation.resolve("students", out)
    return run_search(config, location, progress=False), config, location


def test_students_sit_on_the_frontier_with_their_architecture_columns(student_study) -> None:
    study, _config, location = student_study
    trials = pd.read_csv(location.out_dir / "trials.csv")
    frontier = pd.read_csv(location.out_dir / "frontier.csv")
    columns = ["num_layers", "intermediate_size", "heads", "kv_heads", "hidden_size"]
    assert set(columns) <= set(trials.columns) and set(columns) <= set(frontier.columns)

    students = frontier[frontier["student"]]
    assert len(students) >= 1  # the smallest plan is always on the frontier, and here it is a student
    for row in students.itertuples():
        params = study.trials[row.trial].params
        assert (row.num_layers, row.intermediate_size) == (
            params.get("student.num_layers", 2),
            params.get("student.intermediate_size", 128),
        )
        assert (row.num_layers, row.intermediate_size) != (2, 128)
        assert (row.heads, row.kv_heads, row.hidden_size) == (4, 2, 64)
        assert TrialRecord.of(study.trials[row.trial]).kd_curve[-1][0] == FAST_DISTILLATION["steps"]
    assert "student:" in (location.out_dir / "report.md").read_text()


def test_the_best_student_trial_exports_and_loads_with_its_own_shape(student_study, tmp_path) -> None:
    from autocompress.export import export_trial

    study, _config, location = student_study
    student = next(record for record in trial_records(study) if record.student)
    result = export_trial(StudyRecord.of(study), location, student, tmp_path / "student")
    loaded, tokenizer = load(result.path)
    shape = student.architecture
    assert (loaded.config.num_hidden_layers, loaded.config.intermediate_size) == (
        shape["num_layers"],
        shape["intermediate_size"],
    )
    assert tokenizer is not None
    assert result.accounted_bytes == student.size_bytes
    assert result.fitness_loss == pytest.approx(student.loss, rel=1e-4)  # the cached student


# --- early stopping ---------------------------------------------------------------------------------------------


def finished_student(study: optuna.Study, kl_at_4: float, dense_bytes: int) -> None:
    study.add_trial(
        create_trial(
            values=[kl_at_4, 0.5],
            user_attrs={"kd_curve": [[2, 2 * kl_at_4], [4, kl_at_4]], "student_dense_bytes": dense_bytes},
        )
    )


@pytest.mark.parametrize(
    ("kl", "dense_bytes", "stopped"),
    [
        (0.9, 1000, True),  # worse than the median of students no larger than it
        (0.5, 1000, False),  # better than that median
        (0.9, 150, False),  # smaller than every other student: nothing to compare with
    ],
)
def test_the_median_rule_of_a_pareto_study_compares_a_student_with_no_larger_ones(kl, dense_bytes, stopped) -> None:
    study = optuna.create_study(directions=["minimize", "minimize"])
    for kl_at_4, size in [(0.4, 200), (0.6, 300), (0.8, 400), (0.1, 5000)]:
        finished_student(study, kl_at_4, size)
    settings = DistillationConfig(pruner="median", startup_trials=2)
    assert student_pruning(trial_records(study), step=4, kl=kl, size_bytes=dense_bytes, settings=settings) is stopped


def test_successive_halving_judges_only_at_its_rungs_and_keeps_the_best_third() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"])
    for kl_at_4 in (0.4, 0.5, 0.6):
        finished_student(study, kl_at_4, 100)
    settings = DistillationConfig(pruner="halving", report_every=2, reduction_factor=2, startup_trials=1)
    judge = lambda step, kl: student_pruning(trial_records(study), step, kl, 100, settings)  # noqa: E731
    assert judge(4, 0.45) is False  # rung 4 = 2·2: second best of 4, in the better half
    assert judge(4, 0.55) is True  # third of 4
    assert judge(2, 9.9) is True  # rung 2: the worst of all
    study.add_trial(create_trial(values=[1, 1], user_attrs={"kd_curve": [[6, 0.1]], "student_dense_bytes": 1}))
    assert judge(6, 9.9) is False  # 6 is no rung: no verdict


def test_a_scalar_study_stops_a_hopeless_student_at_its_first_report(tmp_path, tiny_model_dir, corpus) -> None:
    # Size dominates α·KD + β·Size here: a student twice as large as the finished one is hopeless at once.
    config = Config.model_validate(
        tiny_config(
            tiny_model_dir,
            corpus,
            objective="scalar",
            beta=100.0,
            seeds="none",
            student={"num_layers": [1, 2], "intermediate_size": [64, 96], "distillation": FAST_DISTILLATION},
        )
    )
    location = StudyLocation.resolve("hopeless", tmp_path)
    session = CompressionSession(config, cache_dir=location.cache_dir)
    space = SearchSpace(config, unit_names(session.model, config.compression.granularity))
    study, _ = open_study(config, location, space, seed=0)
    study.enqueue_trial({"student.num_layers": 1, "student.intermediate_size": 64})
    study.enqueue_trial({"student.num_layers": 2, "student.intermediate_size": 96})
    study.optimize(Objective(config, session, space, None), n_trials=2)

    finished, hopeless = study.trials
    assert finished.state == TrialState.COMPLETE
    assert hopeless.state == TrialState.PRUNED
    assert TrialRecord.of(hopeless).pruned_at_step == FAST_DISTILLATION["report_every"]
    assert len(TrialRecord.of(hopeless).kd_curve) == 1
    assert hopeless.intermediate_values  # the Optuna pruner saw the report
    cached = list(location.cache_dir.rglob("students/*.safetensors"))
    assert len(cached) == 1  # the finished student is kept for later plans; a stopped one is not


def test_the_student_search_space_example_is_a_valid_config() -> None:
    config = load_config(Path(__file__).parents[1] / "search_spaces" / "smollm2-students.yaml")
    assert config.search.student.dimensions() == {"num_layers": [18, 24, 30], "intermediate_size": [1024, 1536]}


def test_apply_runs_a_student_plan_file_distilled_pruned_recovered_and_quantized(
    tmp_path: Path, tiny_model_dir: Path, corpus: Path, capsys
) -> None:
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, corpus)))
    plan = CompressionPlan(
        student=StudentArchitecture(num_layers=1),
        default=LayerCompression(sparsity=0.5, bits=4),
        group_size=32,
        recovery_steps=2,
    )
    (tmp_path / "plan.json").write_text(plan.to_json())
    main(["apply", str(config), "--plan", str(tmp_path / "plan.json"), "--json"])
    result = json.loads(capsys.readouterr().out)
    student_linears = {name for name in result["per_layer_bytes"] if name.startswith("model.layers.0.")}
    assert set(result["per_layer_bytes"]) == student_linears and len(student_linears) == 7  # one block: q k v o, MLP
    assert result["size_ratio"] < 0.5 and result["dense_bytes"] > result["size_bytes"]
