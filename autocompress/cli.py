"""The `autocompress` command and its sub-commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from autocompress.config import Config, describe_validation_error, load_config
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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as error:
        print(f"autocompress: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("autocompress: interrupted", file=sys.stderr)
        sys.exit(130)
