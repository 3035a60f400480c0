"""The `autocompress` command and its sub-commands."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pydantic import ValidationError

from autocompress.config import Config, describe_validation_error, load_config
from autocompress.errors import UserError
from autocompress.methods import PRUNERS, QUANTIZERS
from autocompress.plan import CompressionPlan
from autocompress.targets import EXPORT_FORMATS

if TYPE_CHECKING:
    import optuna

    from autocompress.record import StudyLocation


def json_text(value: object) -> str:
    from autocompress.provenance import json_default

    return json.dumps(value, indent=2, default=json_default)


def plan_from_args(config: Config, args: argparse.Namespace) -> CompressionPlan:
    options = config.compression.plan_options()
    if args.method:
        if args.method in PRUNERS:
            options["pruning"] = args.method
        elif args.method in QUANTIZERS:
            options["quantization"] = args.method
        else:
            known = ", ".join(sorted([*PRUNERS, *QUANTIZERS]))
            raise UserError(f"--method: unknown method {args.method!r}; known: {known}")
    if args.group_size is not None:
        options["group_size"] = args.group_size
    try:
        if args.plan:
            plan = read_plan(args.plan)
            overrides = {key: value for key, value in options.items() if key in ("pruning", "quantization")}
            return plan.model_copy(update=overrides) if args.method else plan
        if args.format is not None and args.bits != 16:
            raise UserError("--bits and --format both set the precision; give one")
        return CompressionPlan.uniform(sparsity=args.sparsity, bits=args.bits, format=args.format, **options)
    except ValidationError as error:
        raise UserError(f"plan: {describe_validation_error(error)}") from error


def read_plan(path: str) -> CompressionPlan:
    """The CompressionPlan in the JSON file `path` (`--plan`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(f"--plan: cannot read {path} ({error.strerror or error})") from error
    try:
        return CompressionPlan.from_json(text)
    except ValidationError as error:
        raise UserError(f"--plan: {describe_validation_error(error)}") from error


def command_apply(args: argparse.Namespace) -> None:
    from autocompress.apply import oneshot

    config = load_config(args.config)
    plan = plan_from_args(config, args)
    result = oneshot(config, plan, progress=not args.json)
    if args.json:
        print(json.dumps(result.as_dict()))
        return
    print(f"dense held-out perplexity       {result.dense_ppl:10.3f}")
    print(f"compressed held-out perplexity  {result.heldout_ppl:10.3f}")
    print(f"KL to dense (nats/token)        {result.kl:10.4f}")
    print(f"size                            {result.size_bytes:10,d} bytes ({result.size_ratio:.1%} of fp16)")
    print(f"throughput                      {result.tokens_per_s:10.1f} tokens/s")


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '30m', '8h' or '1d'."""
    from autocompress.config import duration_seconds

    try:
        return duration_seconds(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def trial_count(text: str) -> int:
    """A number of trials: a whole number, 0 or more."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"cannot be negative, got {text!r}")
    return count


class OneLineParser(argparse.ArgumentParser):
    """Argument mistakes in one line with exit 2, as every other mistake: the usage is one --help away."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"autocompress: error: {message} (see {self.prog} --help)\n")


def study_location(name: str, args: argparse.Namespace):
    from autocompress.search import StudyLocation

    return StudyLocation.resolve(name, args.results, args.storage)


RAY_FLAGS = ("address", "gpus_per_trial", "cpus_per_trial", "concurrency", "max_failures")


def command_search(args: argparse.Namespace) -> None:
    from autocompress.search import run_search
    from autocompress.search.storage import masked_url

    config = load_config(args.config)
    location = study_location(args.study or Path(args.config).stem, args)
    if args.backend == "ray":
        from autocompress.search.ray_backend import run_ray_search

        study = run_ray_search(
            config,
            location,
            n_trials=args.n_trials,
            timeout=args.timeout,
            progress=not args.quiet,
            address=args.address,
            cpus_per_trial=1.0 if args.cpus_per_trial is None else args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
            concurrency=args.concurrency,
            max_failures=3 if args.max_failures is None else args.max_failures,
        )
    else:
        given = [flag for flag in RAY_FLAGS if getattr(args, flag) is not None]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} goes with --backend ray")
        study = run_search(config, location, n_trials=args.n_trials, timeout=args.timeout, progress=not args.quiet)
    print(
        f"study {location.name!r}: {len(study.trials)} trials in {masked_url(location.storage_url)}; "
        f"outputs in {location.out_dir}"
    )
    print_conclusion(study, location, config)


def command_worker(args: argparse.Namespace) -> None:
    from autocompress.search.worker import run_worker, run_workers

    if args.n_workers < 1:
        raise UserError(f"--n-workers must be at least 1, got {args.n_workers}")
    location = study_location(args.study, args)
    if args.n_workers == 1:
        run_worker(location, n_trials=args.n_trials, timeout=args.timeout, progress=not args.quiet)
        return
    worker_args = ["--study", args.study, "--results", args.results, "--quiet"]
    worker_args += ["--storage", location.storage_url]
    if args.n_trials is not None:
        worker_args += ["--n-trials", str(args.n_trials)]
    if args.timeout is not None:
        worker_args += ["--timeout", f"{args.timeout}s"]
    code = run_workers(worker_args, args.n_workers)
    if code:
        sys.exit(code)


def command_frontier(args: argparse.Namespace) -> None:
    from autocompress.frontier import frontier_points
    from autocompress.record import StudyRecord, trial_records
    from autocompress.search.heldout import judge_frontier
    from autocompress.search.study import load_existing

    location = study_location(args.study, args)
    study, record = load_existing(location)
    search = record.config.search
    if args.gamma is not None and not search.speed_objective:
        raise UserError(f"--gamma weighs speed, which is not among study {record.name!r}'s objectives")
    alpha = search.alpha if args.alpha is None else args.alpha
    beta = search.beta if args.beta is None else args.beta
    max_bytes = record.max_bytes(args.max_size)
    min_tps = record.min_tps(args.min_speed)
    judge_frontier(study, location, max_bytes, min_tps)
    points = frontier_points(StudyRecord.of(study), trial_records(study), max_bytes, alpha, beta, args.gamma, min_tps)
    if args.json:
        print(json.dumps([{**vars(point), "objective": point.objective} for point in points], indent=2))
        return
    speed = record.speed is not None
    print(
        f"{'rank':>4} {'trial':>5} {'loss':>9} {'size_bytes':>12} {'size':>7} "
        + (f"{'tokens/s':>9} {'speed':>6} " if speed else "")
        + f"{'objective':>9} {'heldout_ppl':>11} {'heldout_kl':>10}"
    )
    for rank, point in enumerate(points, start=1):
        ppl = "" if point.heldout_ppl is None else f"{point.heldout_ppl:.3f}"
        kl = "" if point.heldout_kl is None else f"{point.heldout_kl:.4f}"
        tps = f"{point.predicted_decode_tps:>9.1f} {point.speed_ratio:>5.2f}x " if speed else ""
        print(
            f"{rank:>4} {point.trial:>5} {point.loss:>9.4f} {point.size_bytes:>12,d} {point.size_ratio:>7.1%} {tps}"
            f"{point.objective:>9.4f} {ppl:>11} {kl:>10}{'  (uniform seed)' if point.is_seed else ''}"
        )
    if speed:
        print(
            f"tokens/s: predicted decode tokens/s in {target_runtime(record.config)} on {record.speed.threads} "
            f"thread(s); speed: as a multiple of the dense model's {record.speed.dense_decode_tps:,.1f}"
        )


def target_runtime(config: Config) -> str:
    from autocompress.targets import target_named

    return target_named(config.compression.target).runtime or "transformers"


def command_report(args: argparse.Namespace) -> None:
    from autocompress.record import StudyRecord
    from autocompress.report import write_html_report, write_outputs
    from autocompress.search.heldout import judge_frontier
    from autocompress.search.study import load_existing, study_session
    from autocompress.sensitivity import study_sensitivity

    location = study_location(args.study, args)
    study, record = load_existing(location)
    judge_frontier(study, location, record.max_bytes())
    write_outputs(study, location)
    open_session = (lambda: study_session(record.config, location.cache_dir)) if args.sensitivity else None
    html = write_html_report(study, location, study_sensitivity(study, StudyRecord.of(study), open_session))
    print(f"wrote {location.out_dir}/report.md, {html.name}, trials.csv, frontier.csv, pareto.png")
    print_conclusion(study, location, record.config)


def print_conclusion(study: optuna.Study, location: StudyLocation, config: Config) -> None:
    """What the study's deployment target judges of its result (llama.cpp's verdict under a preset's size)."""
    from autocompress.targets import target_named

    lines = target_named(config.compression.target).conclude(study, location)
    if lines:
        print("\n".join(lines))


def command_export(args: argparse.Namespace) -> None:
    from autocompress.export import choose_trial, export_plan, export_trial
    from autocompress.search.study import load_existing

    choosing = (args.alpha, args.beta, args.gamma, args.max_size, args.min_speed)
    if args.pick is None and any(option is not None for option in choosing):
        raise UserError(
            "--alpha, --beta, --gamma, --max-size and --min-speed choose among the frontier; they go with --pick best "
            "or --pick fastest"
        )
    plan = None if args.plan is None else read_plan(args.plan)  # a bad file is refused before the study opens
    location = study_location(args.study, args)
    study, record = load_existing(location)
    if plan is not None:
        chosen_by = f"the plan in {args.plan}"
        result = export_plan(record, location, plan, args.out_dir, args.format, args.overwrite, chosen_by)
    else:
        chosen, chosen_by = choose_trial(
            study,
            record,
            args.trial,
            args.alpha,
            args.beta,
            args.max_size,
            pick=args.pick or "best",
            gamma=args.gamma,
            min_speed=args.min_speed,
        )
        result = export_trial(record, location, chosen, args.out_dir, args.format, args.overwrite, chosen_by)
    if result.warning is not None:
        print(f"autocompress: warning: {result.warning}", file=sys.stderr)
    if args.json:
        print(json_text(result.as_dict()))
        return
    exported = "the plan" if result.trial is None else f"trial {result.trial}"
    print(f"exported {exported} of study {location.name!r} ({chosen_by}) to {result.path}")
    if result.trial_loss is not None:
        print(f"fitness loss       {result.fitness_loss:.6f} (the trial recorded {result.trial_loss:.6f})")
    accounted = result.trial_size_bytes or result.accounted_bytes
    gap = (result.weights_bytes - accounted) / accounted
    print(f"weights on disk    {result.weights_bytes:,} bytes ({gap:+.2%} against the {accounted:,} bytes accounted)")
    for note in result.notes:
        if note.startswith("GGUF tensor types"):
            print(note)


def command_evaluate(args: argparse.Namespace) -> None:
    from autocompress.evaluate import evaluate_artifact, evaluation_lines

    data = load_config(args.data).data if args.data else None
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    result = evaluate_artifact(
        args.path,
        data,
        args.device,
        args.new_tokens,
        dense=not args.no_dense,
        against=args.against,
        threads=args.threads,
    )
    if args.json:
        print(json_text(result))
        return
    print("\n".join(evaluation_lines(result)))


def add_study_arguments(parser: argparse.ArgumentParser, study_required: bool) -> None:
    """--study, --storage, and --results: the folder of study outputs, named alike in every command (`export --out`
    is the folder it writes the model to)."""
    parser.add_argument("--study", required=study_required, help="study name (default: the config file's name)")
    parser.add_argument(
        "--storage",
        help="Optuna storage URL (default: sqlite:///RESULTS/STUDY/study.db); "
        "postgresql://..., or a journal file ending in .log",
    )
    parser.add_argument(
        "--results",
        metavar="DIR",
        default="results",
        help="folder holding each study's outputs (default: results)",
    )


def add_trust_arguments(parser: argparse.ArgumentParser) -> None:
    """--allow-pickle and --trust-remote-code: the only way to switch those on for a model whose config comes from
    a study's storage or an artifact (a config YAML of the user's own may set them itself)."""
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickled checkpoints (.bin, .pt) of a model; they can run code, so only for files you trust",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a model that a study's storage or an artifact names run its own Python code (only if you trust it)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="autocompress", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    apply = commands.add_parser("apply", help="compress with one plan and compare with the dense model")
    apply.add_argument("config", help="study config YAML (model, data, compression)")
    apply.add_argument("--sparsity", type=float, default=0.0, help="fraction of weights pruned in every layer")
    apply.add_argument("--bits", type=int, default=16, help="bit-width of every layer (16: not quantized)")
    apply.add_argument(
        "--format", help="precision level of every layer instead of --bits: int4-g128, nf4, mxfp4, nvfp4, fp8-e4m3..."
    )
    apply.add_argument("--group-size", type=int, help="weights per quantization scale; -1 for one per row")
    apply.add_argument("--method", help="pruning or quantization method, e.g. wanda, magnitude, rtn")
    apply.add_argument("--plan", help="a CompressionPlan JSON file instead of a uniform plan")
    apply.add_argument("--json", action="store_true", help="print one JSON object")
    add_trust_arguments(apply)
    apply.set_defaults(run=command_apply)

    search = commands.add_parser("search", help="run or resume a study over per-layer compression plans")
    search.add_argument("config", help="search space YAML (model, data, compression, search)")
    add_study_arguments(search, study_required=False)
    search.add_argument("--n-trials", type=trial_count, help="stop once the study holds this many complete trials")
    search.add_argument("--timeout", type=parse_duration, help="stop starting trials after this long (90s, 30m, 8h)")
    search.add_argument("--quiet", action="store_true", help="no progress bars")
    add_trust_arguments(search)
    ray = search.add_argument_group("distributed (--backend ray)")
    ray.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local: trials in this process (default); ray: Ray Tune runs them on a Ray cluster",
    )
    ray.add_argument("--address", help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT (default: start one)")
    ray.add_argument("--gpus-per-trial", type=float, help="GPUs each trial holds (default: 1 if the cluster has any)")
    ray.add_argument("--cpus-per-trial", type=float, help="CPUs each trial holds (default: 1)")
    ray.add_argument("--concurrency", type=int, help="trials running at once (default: as many as the cluster fits)")
    ray.add_argument("--max-failures", type=int, help="re-runs of a trial whose Ray worker died (default: 3)")
    search.set_defaults(run=command_search)

    worker = commands.add_parser(
        "worker", help="join an existing study (e.g. on PostgreSQL) and run its trials; from any machine"
    )
    add_study_arguments(worker, study_required=True)
    worker.add_argument("--n-workers", type=int, default=1, help="worker processes on this machine (default: 1)")
    worker.add_argument("--n-trials", type=trial_count, help="stop once the study holds this many complete trials")
    worker.add_argument("--timeout", type=parse_duration, help="stop starting trials after this long (90s, 30m, 8h)")
    worker.add_argument("--quiet", action="store_true", help="no progress bars")
    add_trust_arguments(worker)
    worker.set_defaults(run=command_worker)

    frontier = commands.add_parser("frontier", help="the Pareto frontier of a study, ranked by alpha*Loss + beta*Size")
    add_study_arguments(frontier, study_required=True)
    frontier.add_argument("--alpha", type=float, help="weight of Loss (default: the study's)")
    frontier.add_argument("--beta", type=float, help="weight of Size (default: the study's)")
    frontier.add_argument("--gamma", type=float, help="weight of Speed, an objective (default: the study's)")
    frontier.add_argument("--max-size", help="only plans up to this size: bytes ('80MB') or a fraction ('0.5')")
    frontier.add_argument(
        "--min-speed",
        help="only plans at least this fast (predicted decode): tokens/s (150), '1.2x' the dense model or "
        "'1.3x q4_k_m'",
    )
    frontier.add_argument("--json", action="store_true", help="print JSON")
    add_trust_arguments(frontier)
    frontier.set_defaults(run=command_frontier)

    report = commands.add_parser("report", help="write a study's outputs (trials.csv, frontier.csv, plots, report.md)")
    add_study_arguments(report, study_required=True)
    report.add_argument(
        "--no-sensitivity",
        dest="sensitivity",
        action="store_false",
        help="do not measure the per-unit sensitivity profile for report.html (one evaluation per unit; "
        "a profile measured before is still shown)",
    )
    add_trust_arguments(report)
    report.set_defaults(run=command_report)

    export = commands.add_parser(
        "export", help="write a trial's plan as a real compressed artifact (or a Hugging Face folder, or GGUF)"
    )
    add_study_arguments(export, study_required=True)
    chosen = export.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--trial", type=int, help="the trial number to export")
    chosen.add_argument(
        "--plan", help="a CompressionPlan JSON file to export instead of a trial, compressed as the study's trials are"
    )
    chosen.add_argument(
        "--pick",
        choices=["best", "fastest"],
        help="best: the frontier member with the lowest objective; fastest: the one with the highest predicted "
        "decode tokens/s (a study that predicts speed)",
    )
    export.add_argument("--alpha", type=float, help="weight of Loss for --pick best (default: the study's)")
    export.add_argument("--beta", type=float, help="weight of Size for --pick best (default: the study's)")
    export.add_argument("--gamma", type=float, help="weight of Speed for --pick best (default: the study's)")
    export.add_argument("--max-size", help="--pick among plans up to this size: bytes ('80MB') or a fraction")
    export.add_argument(
        "--min-speed", help="--pick among plans at least this fast: tokens/s, '1.2x' the dense model or '1.3x q4_k_m'"
    )
    export.add_argument("--out", dest="out_dir", metavar="DIR", required=True, help="the folder to write")
    export.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        help="compressed: bit-packed artifact for autocompress.load (the default of target artifact); hf: plain "
        "dense Hugging Face folder; gguf: model.gguf for llama.cpp; compressed-tensors: a checkpoint for vLLM "
        "(the default of target vllm)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace the folder if it exists")
    export.add_argument("--json", action="store_true", help="print JSON")
    add_trust_arguments(export)
    export.set_defaults(run=command_export)

    evaluate = commands.add_parser(
        "evaluate",
        help="held-out perplexity, KL statistics to the dense model, size, load time and speed of an artifact or "
        "GGUF file",
    )
    evaluate.add_argument(
        "path",
        metavar="artifact",
        help="a folder written by `autocompress export`, or a file another target's "
        "runtime judges (a .gguf file: llama.cpp)",
    )
    evaluate.add_argument(
        "--against",
        metavar="OTHER",
        help="another artifact (or .gguf file, beside a .gguf file) scored on the same windows: paired per-window "
        "differences with bootstrap 95%% intervals",
    )
    evaluate.add_argument("--data", help="a config YAML whose data section replaces the one the artifact records")
    evaluate.add_argument("--device", help="cpu, cuda, ... (default: the device the study's config names)")
    evaluate.add_argument("--new-tokens", type=int, default=32, help="tokens generated to time generate()")
    evaluate.add_argument("--no-dense", action="store_true", help="skip the dense base model")
    evaluate.add_argument("--threads", type=int, help="CPU threads for torch and llama.cpp (default: all)")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    add_trust_arguments(evaluate)
    evaluate.set_defaults(run=command_evaluate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from autocompress.models import ALLOW_PICKLE_ENV, TRUST_REMOTE_CODE_ENV

    for flag, variable in (("allow_pickle", ALLOW_PICKLE_ENV), ("trust_remote_code", TRUST_REMOTE_CODE_ENV)):
        if getattr(args, flag, False):
            os.environ[variable] = "1"  # also for worker processes this one starts
    try:
        args.run(args)
    except UserError as error:
        print(f"autocompress: error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {error.filename}" if error.filename else ""
        print(
            f"autocompress: error: no space left on the device{where}; free some and run the command again "
            "(what was stored before is kept whole)",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        print("autocompress: interrupted; the study is saved and resumes where it stopped", file=sys.stderr)
        sys.exit(130)
