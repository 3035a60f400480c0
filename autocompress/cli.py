"""The `autocompress` command and its sub-commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from autocompress.config import Config, describe_validation_error, load_config, parse_size
from autocompress.errors import UserError
from autocompress.methods import PRUNERS, QUANTIZERS
from autocompress.plan import CompressionPlan


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
            try:
                text = Path(args.plan).read_text(encoding="utf-8")
            except OSError as error:
                raise UserError(f"--plan: cannot read {args.plan} ({error.strerror or error})") from error
            plan = CompressionPlan.from_json(text)
            overrides = {key: value for key, value in options.items() if key in ("pruning", "quantization")}
            return plan.model_copy(update=overrides) if args.method else plan
        return CompressionPlan.uniform(sparsity=args.sparsity, bits=args.bits, **options)
    except ValidationError as error:
        raise UserError(f"plan: {describe_validation_error(error)}") from error


def command_apply(args: argparse.Namespace) -> None:
    from autocompress.oneshot import oneshot

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
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}; use e.g. 90s, 30m, 8h") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, got {text!r}")
    return seconds


def study_location(name: str, args: argparse.Namespace):
    from autocompress.search import StudyLocation

    return StudyLocation.resolve(name, args.out, args.storage)


def command_search(args: argparse.Namespace) -> None:
    from autocompress.search import run_search

    config = load_config(args.config)
    location = study_location(args.study or Path(args.config).stem, args)
    study = run_search(config, location, n_trials=args.n_trials, timeout=args.timeout, progress=not args.quiet)
    print(
        f"study {location.name!r}: {len(study.trials)} trials in {location.storage_url}; outputs in {location.out_dir}"
    )


def command_frontier(args: argparse.Namespace) -> None:
    from autocompress.frontier import frontier_points
    from autocompress.search.study import dense_bytes_of, judge_frontier, load_existing

    location = study_location(args.study, args)
    study, config = load_existing(location)
    alpha = config.search.alpha if args.alpha is None else args.alpha
    beta = config.search.beta if args.beta is None else args.beta
    limit = args.max_size if args.max_size is not None else config.search.max_size
    dense_bytes = dense_bytes_of(study)
    try:
        max_bytes = None if limit is None or dense_bytes is None else parse_size(limit, dense_bytes)
    except ValueError as error:
        raise UserError(f"--max-size: {error}") from error
    judge_frontier(study, config, location, max_bytes)
    points = frontier_points(study, max_bytes, alpha, beta)
    if args.json:
        print(json.dumps([{**vars(point), "objective": point.objective} for point in points], indent=2))
        return
    print(
        f"{'rank':>4} {'trial':>5} {'loss':>9} {'size_bytes':>12} {'size':>7} {'objective':>9} "
        f"{'heldout_ppl':>11} {'heldout_kl':>10}"
    )
    for rank, point in enumerate(points, start=1):
        ppl = "" if point.heldout_ppl is None else f"{point.heldout_ppl:.3f}"
        kl = "" if point.heldout_kl is None else f"{point.heldout_kl:.4f}"
        print(
            f"{rank:>4} {point.trial:>5} {point.loss:>9.4f} {point.size_bytes:>12,d} {point.size_ratio:>7.1%} "
            f"{point.objective:>9.4f} {ppl:>11} {kl:>10}{'  (uniform seed)' if point.is_seed else ''}"
        )


def command_report(args: argparse.Namespace) -> None:
    from autocompress.report import write_outputs
    from autocompress.search.study import dense_bytes_of, judge_frontier, load_existing

    location = study_location(args.study, args)
    study, config = load_existing(location)
    dense_bytes = dense_bytes_of(study)
    limit = config.search.max_size
    judge_frontier(
        study, config, location, None if limit is None or dense_bytes is None else parse_size(limit, dense_bytes)
    )
    write_outputs(study, location, config)
    print(f"wrote {location.out_dir}/report.md, trials.csv, frontier.csv, pareto.png")


def add_study_arguments(parser: argparse.ArgumentParser, study_required: bool) -> None:
    parser.add_argument("--study", required=study_required, help="study name (default: the config file's name)")
    parser.add_argument(
        "--storage",
        help="Optuna storage URL (default: sqlite:///OUT/STUDY/study.db); "
        "postgresql://..., or a journal file ending in .log",
    )
    parser.add_argument("--out", default="results", help="folder holding each study's outputs (default: results)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autocompress", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    apply = commands.add_parser("apply", help="compress with one plan and compare with the dense model")
    apply.add_argument("config", help="study config YAML (model, data, compression)")
    apply.add_argument("--sparsity", type=float, default=0.0, help="fraction of weights pruned in every layer")
    apply.add_argument("--bits", type=int, default=16, help="bit-width of every layer (16: not quantized)")
    apply.add_argument("--group-size", type=int, help="weights per quantization scale; -1 for one per row")
    apply.add_argument("--method", help="pruning or quantization method, e.g. wanda, magnitude, rtn")
    apply.add_argument("--plan", help="a CompressionPlan JSON file instead of a uniform plan")
    apply.add_argument("--json", action="store_true", help="print one JSON object")
    apply.set_defaults(run=command_apply)

    search = commands.add_parser("search", help="run or resume a study over per-layer compression plans")
    search.add_argument("config", help="search space YAML (model, data, compression, search)")
    add_study_arguments(search, study_required=False)
    search.add_argument("--n-trials", type=int, help="stop once the study holds this many complete trials")
    search.add_argument("--timeout", type=parse_duration, help="stop starting trials after this long (90s, 30m, 8h)")
    search.add_argument("--quiet", action="store_true", help="no progress bars")
    search.set_defaults(run=command_search)

    frontier = commands.add_parser("frontier", help="the Pareto frontier of a study, ranked by alpha*Loss + beta*Size")
    add_study_arguments(frontier, study_required=True)
    frontier.add_argument("--alpha", type=float, help="weight of Loss (default: the study's)")
    frontier.add_argument("--beta", type=float, help="weight of Size (default: the study's)")
    frontier.add_argument("--max-size", help="only plans up to this size: bytes ('80MB') or a fraction ('0.5')")
    frontier.add_argument("--json", action="store_true", help="print JSON")
    frontier.set_defaults(run=command_frontier)

    report = commands.add_parser("report", help="write a study's outputs (trials.csv, frontier.csv, plots, report.md)")
    add_study_arguments(report, study_required=True)
    report.set_defaults(run=command_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as error:
        print(f"autocompress: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("autocompress: interrupted; the study is saved and resumes where it stopped", file=sys.stderr)
        sys.exit(130)
