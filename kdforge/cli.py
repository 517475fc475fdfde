"""Command line: `kdforge demo | train | eval | methods | data prepare`.

User errors (bad config, unknown names, missing files) print one line and exit with status 2;
only genuine bugs show a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kdforge.errors import KdforgeError
from kdforge.train.log import json_safe


def _cmd_train(args: argparse.Namespace) -> int:
    from kdforge.config import load_config
    from kdforge.train.stages import is_task_recipe, run_recipe
    from kdforge.train.trainer import Trainer

    task_recipe: tuple[str, list[str], bool] | None = None
    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise KdforgeError(f"cannot resume: {saved} not found (is {run_dir} a kdforge run directory?)")
        extra = [args.config] if args.config else []
        if any("=" not in x for x in extra):
            raise KdforgeError("with --resume RUN_DIR give only overrides (a.b=value), not a config file")
        # the interruption point of the first run must not stop the continued one
        overrides = ["trainer.stop_after_steps=null", *extra, *args.overrides]
        if is_task_recipe(saved):
            task_recipe = (str(saved), overrides, True)
        else:
            cfg = load_config(saved, overrides)
    else:
        if not args.config:
            raise KdforgeError("kdforge train needs a CONFIG file (or --resume RUN_DIR)")
        run_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
        if is_task_recipe(args.config):   # multi-label, NCD, SSL, ...: stages of ordinary runs
            task_recipe = (args.config, args.overrides, False)
        else:
            cfg = load_config(args.config, args.overrides)
    from kdforge.train.distributed import shutdown_distributed

    try:
        if task_recipe is not None:
            path, overrides, resume = task_recipe
            result = run_recipe(path, overrides, out=run_dir, resume=resume)
        else:
            result = Trainer(cfg, run_dir, resume=bool(args.resume)).fit()
    except BaseException:
        shutdown_distributed(clean=False)
        raise
    shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":      # under torchrun: print the result once
        print(json.dumps(json_safe(result), indent=2, default=str))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from kdforge.train.evaluate_run import evaluate_run

    print(json.dumps(evaluate_run(args.run_dir, args.checkpoint, args.split, args.overrides), indent=2))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from kdforge.methods.catalog import as_dicts

    rows = sorted(as_dicts(), key=lambda r: (r["kind"] != "seed", r["family"], r["id"]))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["id"]) for r in rows)
    seeds = [r for r in rows if r["kind"] == "seed"]
    done = sum(r["status"] == "implemented" for r in seeds)
    for kind, title in (("seed", f"ICCV 2023 seed methods ({done}/{len(seeds)} implemented)"),
                        ("baseline", "Baselines")):
        print(f"{title}\n{'id':<{width}}  {'status':<11}  paper")
        family = None
        for r in (r for r in rows if r["kind"] == kind):
            if r["family"] != family:
                family = r["family"]
                print(f"  [{family}]")
            print(f"{r['id']:<{width}}  {r['status']:<11}  {r['paper']}")
        print()
    print("run one: kdforge train configs/methods/<id>.yaml --out runs/<id>   (kdforge methods --json for scripts)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kdforge.demo import run_demo
    from kdforge.train.checkpoint import ensure_writable_dir

    ensure_writable_dir(args.out, "demo output directory")

    run_demo(Path(args.out), seed=args.seed, quick=args.quick, threads=args.threads)
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from kdforge.config import load_config
    from kdforge.data.cache import build_teacher_cache
    from kdforge.distill.frozen_teacher import cache_freeze
    from kdforge.distill.terms import LOGITS
    from kdforge.train.build import build_model, default_terms, load_data
    from kdforge.train.trainer import resolve_device

    cfg = load_config(args.config, args.overrides)
    from kdforge.train.checkpoint import ensure_writable_dir

    ensure_writable_dir(Path(args.out).parent if Path(args.out).name else Path(args.out), "cache directory")
    if cfg.teacher is None or not cfg.teacher.checkpoint:
        raise KdforgeError(f"{args.config}: kdforge cache needs teacher.name and teacher.checkpoint")
    if cfg.data.stream:
        raise KdforgeError("kdforge cache does not support streamed data sets yet (data.stream=true); load the "
                           "data in memory (data.stream=false) to cache its teacher outputs")
    data = load_data(cfg.data, cfg.trainer.seed)
    c = data.train.image_shape[0]
    teacher = build_model(cfg.teacher, data.train.num_classes, c, "teacher")
    taps = sorted({n for t in default_terms(cfg) if t.teacher is not None and t.teacher_id == "teacher"
                   for n in ([t.teacher] if isinstance(t.teacher, str) else t.teacher) if n != LOGITS})
    aug = cfg.data.augment
    device = resolve_device(cfg.trainer.device)
    path = build_teacher_cache(teacher, data.train, args.out, epochs_k=args.epochs, seed=cfg.trainer.seed,
                               crop_padding=aug.crop_padding, flip=aug.flip, mean=data.train.mean,
                               std=data.train.std, taps=taps, batch_size=cfg.data.eval_batch_size,
                               device=device, overwrite=args.overwrite,
                               freeze=cache_freeze(cfg.trainer.teacher_freeze, device))
    print(f"teacher cache written to {path} ({args.epochs} epochs of views, taps: {', '.join(taps) or 'none'}); "
          f"train with: kdforge train {args.config} teacher.cache={path}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from kdforge.search.cli import search_command

    out = args.out or str(Path("runs") / f"search-{args.kind}-{Path(args.config).stem}")
    summary = search_command(args.kind, args.config, args.overrides, args.storage, args.trials, out)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from kdforge.experiment import run_experiment

    result = run_experiment(args.recipe, jobs=args.jobs, only=args.only, out=args.out, results=args.results,
                            profile=args.profile, seeds=args.seeds, report=not args.no_report, quiet=args.quiet,
                            overrides=args.overrides)
    if not args.quiet:
        print(json.dumps(json_safe({k: result[k] for k in ("id", "verdict", "mean_delta", "ci95", "seeds")
                                    if k in result} or result), indent=2))
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from kdforge.data.prepare import prepare, prepare_command

    if args.no_download:
        print(f"{args.name} ready in {prepare(args.name, args.root, download=False)}")
    else:
        print(prepare_command(args.name, args.root))
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdforge")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdforge", description="Knowledge distillation on one core: the ICCV 2023 "
                                     "KD methods and the classic baselines, one trainer for every task.")
    parser.add_argument("--version", action="version", version=f"kdforge {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="teacher, scratch student and KD student on procedural data")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    demo.add_argument("--quick", action="store_true", help="a much smaller run (smoke test)")
    demo.set_defaults(fn=_cmd_demo)

    train = sub.add_parser("train", help="train from a YAML recipe: kdforge train CONFIG [a.b=value ...]")
    train.add_argument("config", nargs="?", help="YAML recipe")
    train.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=0.1")
    train.add_argument("--out", help="run directory (default runs/<config name>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    train.set_defaults(fn=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate a run's checkpoint (classification: top-1, top-5, loss; "
                                     "task recipes: their test metrics, e.g. COCO AP)")
    ev.add_argument("run_dir", help="a run directory written by kdforge train")
    ev.add_argument("overrides", nargs="*", help="config overrides, e.g. data.eval_batch_size=512")
    ev.add_argument("--checkpoint", default="last", choices=["last", "best"],
                    help="last (default) or best (exists only with a validation split)")
    ev.add_argument("--split", default="test", choices=["test", "val"],
                    help="test (default) or val (the run's validation split, data.val_fraction > 0)")
    ev.set_defaults(fn=_cmd_eval)

    cache = sub.add_parser("cache", help="run the teacher once over K augmented epochs and store its outputs")
    cache.add_argument("config", help="the training recipe (its teacher, data and augmentation)")
    cache.add_argument("overrides", nargs="*")
    cache.add_argument("--out", required=True, help="cache directory")
    cache.add_argument("--epochs", type=int, default=4, help="augmented epochs to cache (K, default 4)")
    cache.add_argument("--overwrite", action="store_true", help="replace an existing cache directory")
    cache.set_defaults(fn=_cmd_cache)

    search = sub.add_parser("search", help="distiller search: Auto-KD (MCTS) or BOSS (BO + self-distillation)")
    search.add_argument("kind", choices=["autokd", "boss"])
    search.add_argument("config", help="base training recipe (its search options may sit in a search: file)")
    search.add_argument("overrides", nargs="*", help="run overrides a.b=value (search.* for search options)")
    search.add_argument("--storage", help="Optuna storage URL (default: SQLite file in --out); resumable")
    search.add_argument("--trials", type=int, help="trial budget (default: from the search options)")
    search.add_argument("--out", help="search directory (default runs/search-<kind>-<config>)")
    search.set_defaults(fn=_cmd_search)

    exp = sub.add_parser("experiment", help="a method vs its baseline over paired seeds: "
                         "kdforge experiment configs/experiments/<id>.yaml")
    exp.add_argument("recipe", help="experiment recipe (arms, seeds, metric, baseline, method, claim)")
    exp.add_argument("overrides", nargs="*", help="a.b=value overrides for every arm (recorded in the results)")
    exp.add_argument("--jobs", type=int, default=1, help="cells run in parallel processes (default 1)")
    exp.add_argument("--only", help="run only these cells, e.g. arm=kd,seed=3 or stage=teacher (cluster jobs)")
    exp.add_argument("--out", help="run root (default runs/experiments/<id>); re-running resumes it")
    exp.add_argument("--results", help="results JSON (default results/methods/<id>.json; a PNG goes beside it)")
    exp.add_argument("--profile", help="a profile of the recipe, e.g. paper (the paper's scale)")
    exp.add_argument("--seeds", type=int, nargs="+", help="replace the recipe's seeds")
    exp.add_argument("--no-report", action="store_true", help="run cells only; write no results JSON")
    exp.add_argument("--quiet", action="store_true", help="no progress lines")
    exp.set_defaults(fn=_cmd_experiment)

    methods = sub.add_parser("methods", help="list the methods and baselines with their status")
    methods.add_argument("--json", action="store_true", help="machine-readable list (id, family, paper, status, kind)")
    methods.set_defaults(fn=_cmd_methods)

    data = sub.add_parser("data", help="data set tools (kdforge data prepare NAME --root DIR)")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="prepare")
    prep = data_sub.add_parser("prepare", help="download and verify a data set, or say where to put it")
    prep.add_argument("name", help="data set name, e.g. cifar100, cifar10, mnist")
    prep.add_argument("--root", required=True, help="directory to hold the data set files")
    prep.add_argument("--no-download", action="store_true", help="only verify files already in --root")
    prep.set_defaults(fn=_cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kdforge.train.trainer import Interrupted

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:          # bare `kdforge`: the overview, not a usage error
        parser.print_help()
        return 0
    # `a.b=value` overrides may come after options (`train CFG --out D a.b=1`): argparse leaves them over
    stray = [u for u in unknown if u.startswith("-") or "=" not in u]
    if stray or (unknown and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or unknown)}")
    if unknown:
        args.overrides = [*args.overrides, *unknown]
    try:
        return int(args.fn(args) or 0)
    except Interrupted as err:
        print(f"kdforge: {err}", file=sys.stderr)
        return err.exit_code
    except KdforgeError as err:
        print(f"kdforge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:           # `kdforge methods | head`: the reader went away
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
