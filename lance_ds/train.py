r"""Entry point: parse -> check -> build -> Trainer.train() -> close.

  deepspeed --num_gpus 8 lance_ds/train.py --ds_config ds_configs/zero3.json --config configs/debug.yaml \
      --dataset_config configs/datasets/example.yaml [--output_dir DIR] [--resume latest|STEP|none] [key=value ...]

Every config problem is reported at once, before any rank initialises distributed state or builds a model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import traceback
from pathlib import Path

import yaml


DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "zero3.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run YAML (configs/*.yaml, or a run's own config.yaml)")
    p.add_argument("--ds_config", default=str(DEFAULT_DS_CONFIG),
                   help="DeepSpeed JSON; 'auto' values come from the run config (default: this repository's "
                        "ds_configs/zero3.json, wherever the command runs)")
    p.add_argument("--dataset_config", help="dataset YAML (same as dataset_config=FILE)")
    p.add_argument("--output_dir", help="same as output_dir=DIR")
    p.add_argument("--resume", default="latest", help="latest (default: continue if a checkpoint exists), none, or a step")
    p.add_argument("--print_config", action="store_true", help="print the resolved run config and DeepSpeed JSON, then exit")
    p.add_argument("--check", action="store_true", help="check the configs and exit (what the launch scripts run first)")
    p.add_argument("--world_size", type=int, help="with --check or --print_config: the ranks the run will have "
                   "(default: the launcher's WORLD_SIZE, else 1); the DeepSpeed JSON's train_batch_size is checked "
                   "against it")
    p.add_argument("--ranks_elsewhere", action="store_true",
                   help="with --check: the ranks run on other machines (a hostfile), so what needs their GPUs "
                        "(fp16, flash attention) is left to each rank to check")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5 model.visual_gen=false")
    args = p.parse_intermixed_args(argv)  # overrides may come before, between or after the flags
    if args.world_size is not None and not (args.check or args.print_config):
        p.error("--world_size goes with --check or --print_config: a launched run has the launcher's ranks")
    if args.world_size is not None and args.world_size < 1:
        p.error(f"--world_size must be >= 1, got {args.world_size}")
    for flag in ("dataset_config", "output_dir"):
        # given (even empty: refused as such), a path, quoted: YAML would read 0755 as a number, cut "runs/a #2" at #
        if getattr(args, flag) is not None:
            args.overrides.insert(0, f"{flag}={json.dumps(getattr(args, flag))}")
    return args


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def quiet_libraries() -> None:
    """Keep the console for what the user watches: DeepSpeed's per-call INFO lines and torch's deprecation notices
    about calls DeepSpeed makes are not actionable for a lance_ds user."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's log goes to the stdout it finds when imported: stderr,
        import deepspeed  # noqa: F401  (stdout is for --print_config's YAML and JSON)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    from lance_ds.engine import adopt_launcher_env

    refused = adopt_launcher_env()  # srun / mpirun starting this script directly: their ranks, before any check
    # one report per node: a problem only one node sees (a path not mounted there) must be said where it happens
    is_first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if refused:
        if is_first:
            print(f"lance_ds: {refused}", file=sys.stderr)
        return 2
    checked = check_run(args, is_first)
    if checked is None:
        return 2
    run, ds_config = checked
    if args.print_config or args.check:
        if is_first:
            if args.print_config:
                from lance_ds.config.core import to_dict

                print(yaml.safe_dump(to_dict(run.config), sort_keys=False))
                print(json.dumps(ds_config, indent=2))
            else:
                print("lance_ds: configs OK")
        return 0
    return train(run, ds_config, args.resume, is_first)


def check_run(args, is_first: bool):
    """(run, DeepSpeed config) when the configs and --resume are sound; None once the problem is said."""
    from lance_ds.checkpoint import Checkpointer, CheckpointError, checkpoints_dir, engine_setup
    from lance_ds.config import ConfigError, config_warnings, load_and_check
    from lance_ds.config.core import to_dict
    from lance_ds.data.stream import DataError, run_data_order

    world = args.world_size or world_size_from_env()
    # the launch scripts check the configs before they start the ranks, and say the warnings there: once is enough
    warn = is_first and not os.environ.get("LANCE_DS_CONFIG_CHECKED")
    try:
        run, ds_config = load_and_check(args.config, args.overrides, args.ds_config, world,
                                        devices_here=not args.ranks_elsewhere)
        if warn:
            for warning in config_warnings(run.config):
                print(f"lance_ds: warning: {warning}", file=sys.stderr)
        check_data_against_model(run, warn)
        # what --resume names must be resumable by this run (architecture, optimizer groups) before any rank starts work
        checkpointer = Checkpointer(checkpoints_dir(run.config.output_dir), run.config.checkpoint.keep_last, 0, world)
        schedule = run.config.train
        fingerprint, groups = run_data_order(run)
        if run.config.checkpoint.data_change == "restart":  # another data order is read from its beginning
            fingerprint = None
        checkpointer.check_resume(args.resume, to_dict(run.config.model), schedule.max_steps, schedule.weight_decay,
                                  data=fingerprint, prediction=run.config.objective.prediction,
                                  engine=engine_setup(schedule.precision, ds_config), config=to_dict(run.config),
                                  groups=groups)
    except (ConfigError, CheckpointError, DataError) as e:
        if is_first:
            print(f"lance_ds: {e}", file=sys.stderr)
        if not (args.print_config or args.check):
            stop_the_others_too()
        return None
    return run, ds_config


def check_data_against_model(run, warn: bool) -> None:
    """What the data asks of this model, planned as training plans it from a few samples per group (read here, before
    the launcher starts ranks that load the model): a group whose samples are all longer than a packed sequence would
    train nothing (refused); sizes beyond the model's latent position table are cut to it (said)."""
    from lance_ds.config import ConfigError
    from lance_ds.data.sequence import SequencePlanner
    from lance_ds.data.stream import overlong_groups
    from lance_ds.data.tokenizer import load_tokenizer
    from lance_ds.model.build import planned_geometry

    config = run.config
    try:
        geometry = planned_geometry(config.model)
    except (OSError, ValueError) as e:
        raise ConfigError([f"model.vae_path: {e}"]) from None
    planner = SequencePlanner(load_tokenizer(config.model.tokenizer_path), geometry, seed=config.train.seed)
    problems = overlong_groups(run.dataset, planner, config.data.packing_length)
    if problems:
        raise ConfigError(problems)
    if warn:
        for warning in beyond_the_position_table(run.dataset, geometry) + upscaled_media(run.dataset):
            print(f"lance_ds: warning: {warning}", file=sys.stderr)


def beyond_the_position_table(dataset, geometry) -> list[str]:
    """Generation groups that ask for larger or longer media than the model's latent position table holds: they are
    cut to what it holds, which the group's settings do not show."""
    from lance_ds.config.data import GEN_TASKS, VIDEO_TASKS

    side, frames = geometry.max_vae_side, geometry.max_vae_frames
    out = []
    for i, group in enumerate(dataset.groups):
        if group.task not in GEN_TASKS:
            continue
        video = group.task in VIDEO_TASKS
        key = f"dataset_config.groups[{i}] ({group.name})"
        asked = group.resolution_for(video)
        if asked > side:
            out.append(f"{key}: {asked} px, but the model's latent positions reach {side} px (model "
                       f"max_latent_size {geometry.max_latent_size} x the VAE's {geometry.vae_spatial_factor}): its "
                       f"media are cut to at most {side} px a side")
        if video and group.video.max_frames > frames:
            out.append(f"{key}: video.max_frames={group.video.max_frames}, but the model's latent positions hold "
                       f"{frames} frames: clips are cut to {frames}")
    return out


def upscaled_media(dataset) -> list[str]:
    """Groups whose media, at their manifests' mean size, are scaled up more than 2x a side to the area they are cut
    to: the model trains on tokens that carry no more detail than the files (64 px images at resolution 448: 7x)."""
    from lance_ds.data.manifest import mean_media_sizes
    from lance_ds.data.sequence import upscale_factor

    out = []
    for i, group in enumerate(dataset.groups):
        side = group.input_side()
        scaled = [(upscale_factor(height, width, side, group.image), member, height, width)
                  for member, (height, width) in mean_media_sizes(group.shards).items()]
        factor, member, height, width = max(scaled, default=(0, "", 0, 0))
        if factor > 2:
            out.append(f"dataset_config.groups[{i}] ({group.name}): its {member} media are {width:.0f}x{height:.0f} on "
                       f"average, scaled up {factor:.1f}x a side to the {side} px area the group cuts them to; a lower "
                       "resolution trains on fewer tokens, as sharp")
    return out


def train(run, ds_config: dict, resume: str, is_first: bool) -> int:
    """Train to the end (0) or to a stopping signal (128 + its number, saved); anything else ends the process."""
    from lance_ds.checkpoint import CheckpointError
    from lance_ds.config import ConfigError
    from lance_ds.data.stream import DataError
    from lance_ds.model.weights import WeightsFileError
    from lance_ds.processes import survive_lost_console
    from lance_ds.trainer import Trainer

    survive_lost_console()  # a rank whose console goes away (a multi-node stop) still saves and stops

    try:
        trainer = Trainer(run, ds_config, resume=resume)
    except (CheckpointError, ConfigError, DataError, WeightsFileError) as e:
        # found once the model, data and checkpoint are opened (a freeze pattern that matches no parameter): one
        # line, not a traceback per rank; a rank's own files: said by that rank
        if is_first or getattr(e, "rank", None) is not None:
            print(f"lance_ds: {e}", file=sys.stderr)
        exit_now(2)
    except BaseException:
        exit_now(1, traceback.format_exc())
    try:
        stopped = trainer.train()
    except KeyboardInterrupt:  # Ctrl-C twice: at once, the last complete checkpoint kept
        close_after_failure(trainer)
        exit_now(128 + signal.SIGINT)
    except BaseException as error:
        trace = traceback.format_exc() + stall_advice(error, trainer)
        close_after_failure(trainer)
        exit_now(1, trace)
    trainer.close()
    return 128 + stopped if stopped else 0  # stopped by a signal (saved): the shell's code for that signal


def close_after_failure(trainer) -> None:
    """Release what the run holds; a second failure here (the same full disk) must not keep the process from
    exiting with the first one's report."""
    try:
        trainer.close(finished=False)
    except BaseException as e:
        print(f"lance_ds: while closing after the failure: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def stop_the_others_too() -> None:
    """A rank that refused its config (or --resume) joins the process group all the same, to tell the others: a
    problem only one node has (a path not mounted there) left the other nodes waiting out the rendezvous timeout
    (30 minutes). Trainer's first exchange (trainer.refuse_disagreeing_ranks) reads this rank's REFUSED and stops."""
    if "RANK" not in os.environ or world_size_from_env() == 1:
        return  # one process, or a check outside the launcher (scripts/launch.sh runs one before it)
    from lance_ds import distributed
    from lance_ds.engine import init_distributed

    init_distributed(timeout_s=300.0)
    distributed.every_rank(distributed.REFUSED)
    exit_now(2)  # no interpreter shutdown: the process group's teardown aborted once the others had gone


def stall_advice(error: BaseException, trainer) -> str:
    """What a collective's timeout means (torch's own message names neither the cause nor the fix): gloo's words
    for it (NCCL's watchdog ends the process itself, with its "collective operation timeout")."""
    if not re.search(r"Timed out waiting \d+ ?ms", str(error)):
        return ""
    saved = f"step {trainer.saved_step}" if trainer.saved_step is not None else "none yet"
    return (f"lance_ds: rank {trainer.dist.rank} waited more than train.stall_timeout_s="
            f"{trainer.cfg.train.stall_timeout_s:g} s for another rank: that rank stalled or was lost (its output says "
            f"why); the last checkpoint ({saved}) is intact, and the same command resumes from it; raise "
            "train.stall_timeout_s if one rank's step, validation or save can legitimately take longer\n")


def exit_now(code: int, trace: str = "") -> None:
    """End this rank at once, without the interpreter's shutdown. After a failure the others may wait in a collective
    that it will never join, so no shutdown (process-group destructors, a barrier) may run first; its exit makes the
    launcher stop them. The traceback goes out first, so it is not lost."""
    if trace:
        print(f"lance_ds: rank {os.environ.get('RANK', '0')} failed:\n{trace}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    # what the run wrote is closed by now; the interpreter's teardown of torch, DeepSpeed and transformers would
    # take seconds of every rank's exit (and of the scripts' --check), freeing memory the process gives back anyway
    exit_now(main())
