"""Make (or reuse) the CPU main job's tiny teacher, student and data: a thin wrapper of ``megatron_opd.toy``.

    python tools/make_toy_models.py [--cache-dir .cache/toy_models] [--force] [--recipe.FIELD VALUE ...]

Prints the paths and the report (greedy accuracies, SFT seconds) as JSON. A second call with the same recipe
returns at once from the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from megatron_opd.toy import DEFAULT_CACHE_DIR, ToyRecipe, make_toy_models


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(ToyRecipe):
        kind = type(f.default)
        parser.add_argument(
            f"--recipe.{f.name}",
            dest=f"recipe_{f.name}",
            type=kind,
            default=None,
            metavar=kind.__name__.upper(),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cache-dir", default=DEFAULT_CACHE_DIR, help="where made sets are cached (by recipe hash)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache has this recipe")
    _recipe_args(parser)
    args = parser.parse_args(argv)
    overrides = {
        f.name: getattr(args, f"recipe_{f.name}")
        for f in dataclasses.fields(ToyRecipe)
        if getattr(args, f"recipe_{f.name}") is not None
    }
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    made = make_toy_models(ToyRecipe(**overrides), args.cache_dir, force=args.force)
    out = {k: v for k, v in dataclasses.asdict(made).items()}
    out["eval_spec"] = made.eval_spec
    out["seconds"] = round(time.perf_counter() - t0, 2)
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
