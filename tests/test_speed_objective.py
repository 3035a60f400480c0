"""Speed in the study: predicted decode tokens/s as a third objective and as a floor (`search.objectives`,
`search.min_speed`), on the frontier, in `frontier`, `export --pick fastest` and the report. Only the arithmetic and
the plumbing are checked: which speeds llama.cpp's table holds is the machine's, never a figure asserted here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
import yaml
from pydantic import ValidationError

from autocompress.cli import main
from autocompress.config import Config, SpeedFloor, speed_floor
from autocompress.frontier import frontier_of, non_dominated
from autocompress.record import StudyLocation, StudyRecord, scored_records
from autocompress.targets.gguf.llama_cpp import llama_cpp_available
from tests.conftest import write_yaml
from tests.test_config_and_cli import error_line, run_main
from tests.test_gguf_export import require
from tests.test_gguf_study import size_budget_config

SPEED_LEVELS = ["q2_k", "q4_k", "q8_0"]


def speed_config(folder: Path, **search: object) -> dict:
    """A free gguf study of a tiny Mistral whose speed is predicted on one thread."""
    raw = size_budget_config(folder, "50%", compression={"granularity": "linear"})
    raw["search"] = {key: value for key, value in raw["search"].items() if key not in ("budget", "generations")}
    raw["search"] |= {"formats": SPEED_LEVELS, "seeds": "none", "n_trials": 10, "speed_threads": 1} | search
    return raw


@pytest.fixture(scope="module", autouse=True)
def speed_cache(tmp_path_factory: pytest.TempPathFactory):
    """llama.cpp's speed tables cached in one folder for the module: each is measured once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path_factory.mktemp("speed-cache")))
        yield


@pytest.fixture(scope="module")
def speed_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 10-trial gguf study over [loss, size, speed], run by the command line; its config and results folder."""
    require(llama_cpp_available())
    folder = tmp_path_factory.mktemp("speed-study")
    config = write_yaml(folder / "fast.yaml", speed_config(folder, objectives=["loss", "size", "speed"]))
    results = folder / "results"
    main(["search", str(config), "--results", str(results), "--quiet"])
    return config, results


def load(results: Path) -> tuple[optuna.Study, StudyRecord]:
    study = optuna.load_study(study_name="fast", storage=StudyLocation.resolve("fast", results).storage_url)
    return study, StudyRecord.of(study)


def test_a_three_objective_study_maximizes_the_predicted_decode_speed(speed_study) -> None:
    _config, results = speed_study
    study, record = load(results)
    assert [direction.name for direction in study.directions] == ["MINIMIZE", "MINIMIZE", "MAXIMIZE"]
    assert record.speed is not None and record.speed.threads == 1 and record.speed.dense_decode_tps > 0
    trials = {trial.number: trial for trial in study.trials}
    scored = scored_records(study)
    assert len(scored) == 10
    for trial in scored:
        assert trials[trial.number].values == [trial.loss, trial.size_ratio, trial.predicted_decode_tps]
        assert trial.speed_ratio == pytest.approx(trial.predicted_decode_tps / record.speed.dense_decode_tps)
        assert trial.predicted_prompt_tps > 0 and trial.speed_under_floor is None  # no floor in this study
        assert trial.objective == pytest.approx(trial.loss + trial.size_ratio - trial.speed_ratio)  # α = β = γ = 1


def dominates(other, trial) -> bool:
    """`other` is no worse than `trial` on loss, size and speed, and better on one (or, equal, came first)."""
    mine = (trial.loss, trial.size_bytes, -trial.predicted_decode_tps)
    theirs = (other.loss, other.size_bytes, -other.predicted_decode_tps)
    no_worse = all(value <= reference for value, reference in zip(theirs, mine, strict=True))
    return no_worse and (theirs != mine or other.number < trial.number)


def test_its_frontier_is_non_dominated_on_loss_size_and_speed_and_shows_the_speed(speed_study, capsys) -> None:
    _config, results = speed_study
    study, _record = load(results)
    scored = scored_records(study)
    expected = {trial.number for trial in scored if not any(dominates(other, trial) for other in scored)}
    assert {trial.number for trial in frontier_of(scored, speed=True)} == expected
    assert len(expected) >= len(frontier_of(scored))  # a faster plan may be larger: more members, never fewer

    frontier = ["frontier", "--study", "fast", "--results", str(results)]
    points = json.loads(run_main([*frontier, "--json"], capsys)[1])
    assert {point["trial"] for point in points} == expected
    assert all(point["predicted_decode_tps"] > 0 for point in points)
    table = run_main(frontier, capsys)[1].splitlines()
    assert "tokens/s" in table[0] and "speed" in table[0] and len(table) == len(points) + 2
    assert "predicted decode tokens/s in llama.cpp on 1 thread(s)" in table[-1]

    floor = sorted(point["predicted_decode_tps"] for point in points)[len(points) // 2]
    kept = json.loads(run_main([*frontier, "--json", "--min-speed", str(floor)], capsys)[1])
    assert kept and all(point["predicted_decode_tps"] >= floor for point in kept)
    assert {point["trial"] for point in kept} < {point["trial"] for point in points} or len(points) == 1


def test_export_picks_the_fastest_frontier_member(speed_study, tmp_path: Path, capsys) -> None:
    _config, results = speed_study
    study, _record = load(results)
    fastest = max(frontier_of(scored_records(study), speed=True), key=lambda trial: trial.predicted_decode_tps)
    arguments = ["export", "--study", "fast", "--results", str(results), "--pick", "fastest", "--json"]
    code, out, err = run_main([*arguments, "--out", str(tmp_path / "fastest")], capsys)
    assert code == 0, err
    assert json.loads(out)["trial"] == fastest.number
    assert b"fastest on the frontier" in (tmp_path / "fastest" / "model.gguf").read_bytes()  # how it was chosen


def test_report_shows_the_predicted_speed(speed_study, capsys) -> None:
    _config, results = speed_study
    code, _out, err = run_main(["report", "--study", "fast", "--results", str(results), "--no-sensitivity"], capsys)
    assert code == 0, err
    frontier = (results / "fast" / "frontier.csv").read_text().splitlines()[0].split(",")
    assert {"predicted_decode_tps", "speed_ratio"} <= set(frontier)
    assert "predicted_decode_tps" in (results / "fast" / "trials.csv").read_text().splitlines()[0]
    report = (results / "fast" / "report.md").read_text()
    assert "objective: pareto over [loss, size, speed]" in report and "1·Loss + 1·Size − 1·Speed" in report
    assert "predicted by llama.cpp's speed table on 1 thread(s)" in report


def test_a_resume_with_other_objectives_is_refused_in_one_line(speed_study, tmp_path: Path, capsys) -> None:
    config, results = speed_study
    raw = yaml.safe_load(config.read_text())
    raw["search"]["objectives"] = ["loss", "size"]
    changed = write_yaml(tmp_path / "fast.yaml", raw)
    code, _out, err = run_main(["search", str(changed), "--study", "fast", "--results", str(results)], capsys)
    assert error_line(code, err) == (
        "autocompress: error: study 'fast' was created with objectives pareto over [loss, size, speed], not this "
        "config's pareto over [loss, size]; a study's objectives are fixed at creation: use a new --study name"
    )


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"objectives": ["loss", "speed"]}, "search.objectives: give [loss, size] or [loss, size, speed]"),
        ({"objectives": ["loss", "size", "size"]}, "search.objectives: give [loss, size] or [loss, size, speed]"),
        ({"objectives": ["loss", "size", "latency"]}, "search.objectives.2: Input should be"),
        ({"min_speed": "fast"}, "search.min_speed: speed 'fast' is not a speed"),
        ({"min_speed": "1.3x q9_k"}, "'q9_k' is not a llama.cpp preset"),
        ({"min_speed": -3}, "must be positive"),
    ],
)
def test_bad_speed_settings_are_one_line_errors(tmp_path: Path, capsys, search: dict, message: str) -> None:
    path = write_yaml(tmp_path / "bad.yaml", speed_config(tmp_path, **search))
    code, _out, err = run_main(["search", str(path), "--results", str(tmp_path)], capsys)
    assert message in error_line(code, err)


def test_targets_without_a_speed_model_refuse_speed_naming_those_that_have_one() -> None:
    with pytest.raises(ValidationError, match=r"compression.target gguf has and artifact has not"):
        Config.model_validate({"search": {"objectives": ["loss", "size", "speed"]}})
    with pytest.raises(ValidationError, match=r"search.min_speed: speed is predicted .* vllm has not"):
        Config.model_validate({"compression": {"target": "vllm"}, "search": {"min_speed": "1.2x"}})


def test_a_generations_search_takes_speed_as_a_floor_not_an_objective(tmp_path: Path) -> None:
    raw = size_budget_config(tmp_path, "50%", objectives=["loss", "size", "speed"])
    with pytest.raises(ValidationError, match=r"give the speed as a floor, search\.min_speed"):
        Config.model_validate(raw)


def test_speed_floors_are_tokens_or_multiples_of_the_dense_model_or_a_preset() -> None:
    assert speed_floor(150) == SpeedFloor(tokens_per_s=150.0)
    assert speed_floor("1.2x") == SpeedFloor(multiple=1.2)
    assert speed_floor("1.3x Q4_K_M") == SpeedFloor(multiple=1.3, preset="q4_k_m")
    assert speed_floor("1.2x").tokens(dense_tps=50.0) == pytest.approx(60.0)
    assert speed_floor("1.3x q4_k_m").tokens(dense_tps=50.0, preset_tps=100.0) == pytest.approx(130.0)
    assert speed_floor("90").tokens(dense_tps=50.0) == 90.0


def test_points_are_non_dominated_in_three_coordinates_as_in_two() -> None:
    points = [(1.0, 5.0, -10.0), (1.0, 5.0, -12.0), (2.0, 4.0, -30.0), (3.0, 6.0, -31.0), (2.0, 4.0, -30.0)]
    assert non_dominated(points) == [1, 2, 3]  # 0 is slower than 1; 4 repeats 2; 3 is larger and worse but fastest
    assert non_dominated([(point[0], point[1]) for point in points]) == [0, 2]  # on two, speed is not looked at
    assert non_dominated([]) == []


def test_a_speed_floor_makes_slower_plans_infeasible_and_generations_respect_it(tmp_path: Path) -> None:
    """A size budget with a floor at the Q4_K_M preset's predicted speed: every trial records how far under the
    floor it falls (its Optuna constraint), and each offspring a generation recorded meets the floor or, while its
    parent does not, is faster than its parent."""
    require(llama_cpp_available())
    raw = size_budget_config(
        tmp_path,
        "50%",
        compression={"granularity": "linear"},
        formats=["q2_k", "q4_k", "q6_k", "q8_0"],
        min_speed="1.0x q4_k_m",
        speed_threads=1,
        n_trials=14,
    )
    config = write_yaml(tmp_path / "floor.yaml", raw)
    main(["search", str(config), "--results", str(tmp_path / "results"), "--quiet"])
    study = optuna.load_study(
        study_name="floor", storage=StudyLocation.resolve("floor", tmp_path / "results").storage_url
    )
    record = StudyRecord.of(study)
    floor = record.min_tps()
    assert floor == pytest.approx(record.speed.presets["q4_k_m"]) and math.isfinite(floor)
    frozen = {trial.number: trial for trial in study.trials}
    scored = {trial.number: trial for trial in scored_records(study)}
    for trial in scored.values():
        assert trial.speed_under_floor == pytest.approx(floor - trial.predicted_decode_tps)
        assert frozen[trial.number].constraints["speed_under_floor"] == pytest.approx(trial.speed_under_floor)
    offspring = [trial for trial in scored.values() if trial.parent is not None]
    assert offspring
    for child in offspring:
        parent = scored[child.parent].predicted_decode_tps
        assert child.predicted_decode_tps >= floor or child.predicted_decode_tps > parent
    assert all(trial.predicted_decode_tps >= floor for trial in frontier_of(scored.values(), min_tps=floor))


def test_the_ray_backend_asks_one_metric_per_direction_speed_maximized() -> None:
    pytest.importorskip("ray")
    from autocompress.search.ray_backend import StudySearcher
    from autocompress.search.space import SearchSpace

    study = optuna.create_study(directions=["minimize", "minimize", "maximize"])
    searcher = StudySearcher(study, SearchSpace(Config(), ["model.layers.0"]), n_trials=1)
    assert searcher._metric == ["value_0", "value_1", "value_2"] and searcher._mode == ["min", "min", "max"]
    scalar = StudySearcher(optuna.create_study(), SearchSpace(Config(), ["model.layers.0"]), n_trials=1)
    assert scalar._metric == "value_0" and scalar._mode == "min"


def test_a_structure_and_speed_study_runs_from_the_cli_and_predicts_each_blocks_shape(tmp_path: Path, capsys) -> None:
    """`search.structure` with the speed objective: the table holds the alternatives the structure offers (timed
    on llama.cpp's deci probes), and a structural trial's predicted decode time is exactly the table's sum over its
    blocks (nothing for a removed one) and its matrices at their own shapes; export --pick fastest writes it."""
    require(llama_cpp_available())
    from autocompress.session import CompressionSession
    from autocompress.targets.gguf.speed import plan_tensors
    from tests.conftest import tiny_study_config
    from tests.test_gguf_export import SEQ_LEN, bpe_tokenizer
    from tests.test_structure_gguf import teacher

    model_dir = tmp_path / "model"
    teacher().save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    structure = {"ffn": [1, 0.5], "kv_groups": [2, 1, 0], "drop_blocks": True, "distillation": {"steps": 1}}
    search = {
        "sparsity": [0.0],
        "bits": [16],
        "formats": ["q4_k", "q8_0"],
        "n_trials": 8,
        "loss": "kl",
        "structure": structure,
        "objectives": ["loss", "size", "speed"],
        "speed_threads": 1,
    }
    raw = tiny_study_config(tmp_path, model_dir, compression={"target": "gguf"}, search=search)
    raw["data"] |= {"seq_len": SEQ_LEN, "heldout": 2}
    config = write_yaml(tmp_path / "shapes.yaml", raw)
    results = tmp_path / "results"
    main(["search", str(config), "--results", str(results), "--quiet"])
    capsys.readouterr()

    location = StudyLocation.resolve("shapes", results)
    study = optuna.load_study(study_name="shapes", storage=location.storage_url)
    record = StudyRecord.of(study)
    session = CompressionSession(Config.model_validate(raw), cache_dir=location.cache_dir)
    from autocompress.search.space import SearchSpace

    space = SearchSpace.of_record(record)
    speed = session.target.speed_model(session)  # the cached table: nothing is measured again
    table = speed.table
    assert set(table.sub_blocks) == {"ffn:256", "attention:1", "attention:0"}  # the teacher's FFN is 512 wide
    structural = [trial for trial in scored_records(study) if space.plan_from_params(trial.params).structure]
    assert structural, "no sampled trial changed a block's shape"
    for trial in structural:
        plan = space.plan_from_params(trial.params)
        tensors, blocks = plan_tensors(session.weights, plan, session.model.config)
        seconds = table.fixed.decode_s + table.head.decode_s
        for index, block in enumerate(blocks):
            shape = plan.structure.get(f"model.layers.{index}")
            if shape is not None and shape.removed:
                continue
            seconds += table.layer.decode_s
            if shape is not None and shape.kv_groups is not None and shape.kv_groups < 2:
                seconds += table.sub_blocks[f"attention:{shape.kv_groups}"].decode_s
            if shape is not None and shape.ffn < 1:
                seconds += table.sub_blocks[f"ffn:{block.intermediate_size}"].decode_s
        seconds += sum(table.delta(type_name, matrix).decode_s for type_name, matrix in tensors)
        assert trial.predicted_decode_tps == pytest.approx(1 / seconds, rel=1e-9)

    fastest = max(frontier_of(scored_records(study), speed=True), key=lambda trial: trial.predicted_decode_tps)
    arguments = ["export", "--study", "shapes", "--results", str(results), "--pick", "fastest", "--json"]
    code, out, err = run_main([*arguments, "--out", str(tmp_path / "fastest")], capsys)
    assert code == 0, err
    assert json.loads(out)["trial"] == fastest.number
