"""``fit`` and ``pretrain`` as Hydra applications, on Hydra's own machinery.

The flow is Hydra's ``_run_hydra`` (``hydra/_internal/utils.py``, what ``@hydra.main`` runs):
Hydra's argument parser (``-m``/``--multirun``, ``--cfg``, ``--help``, ``--config-dir``,
``--config-name``, ``--info``, ...), its composition, sweeper and launcher, ``run_job`` (output
folder, ``HydraConfig``, job logging, ``.hydra/`` run record) and ``hydra.run.dir`` /
``hydra.sweep.dir``. Three things differ, each for the promise that a bad input stops with one
line and exit code 2 before any work (docs/validation.md):

* the config of the run, or of every job of a sweep, is composed and validated before Hydra
  creates a folder;
* errors go up to ``cli.main`` (one line, or the traceback with ``--debug``) instead of
  Hydra's own report;
* in a single run the ``.hydra/`` record is written once the data, teacher and resume checks
  of ``training.run`` passed, so an input rejected there leaves an existing run untouched
  (the job log, ``<run_dir>/<task>.log``, holds its lines until then for the same reason).

``run_dir`` is the job's output folder: ``run_dir=...`` or ``hydra.run.dir=...`` for a single
run (default ``runs/<task>/<time>``), ``hydra.sweep.dir/<job number>`` in a sweep.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from scm_lightning.config import (
    ConfigError,
    assign_run_dir,
    composition_error,
    conf_dir,
    register_resolvers,
    validate_config,
)

HYDRA_VERSION_BASE = "1.3"
CFG_TYPES = ("job", "hydra", "all")
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def hydra_argv(argv: Sequence[str]) -> list[str]:
    """Our argv as Hydra's parser takes it: a bare ``--cfg`` (or ``-c``) means ``--cfg job``."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in ("--cfg", "-c") and (i + 1 == len(argv) or argv[i + 1] not in CFG_TYPES):
            out.append("job")
    return out


def _composing(fn: Callable[[], Any]) -> Any:
    """Run a Hydra call that composes a config; its errors become one-line ConfigErrors."""
    from hydra.errors import HydraException

    try:
        return fn()
    except ConfigError:
        raise
    except (HydraException, ValueError) as err:  # Hydra raises plain ValueErrors too
        raise composition_error(err) from None


def _is_rank_zero() -> bool:
    return all(int(os.environ.get(k, "0")) == 0 for k in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def _without_hydra(cfg: DictConfig) -> DictConfig:
    job = copy.deepcopy(cfg)
    with read_write(job), open_dict(job):
        job.pop("hydra", None)
    return job


def _overridden(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` (a ``hydra.*`` key) was set on the command line."""
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in cfg.hydra.overrides.hydra)


def _validate_job(cfg: DictConfig) -> None:
    """validate_config on the job part of a composed config (``${hydra:...}`` resolvable)."""
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    validate_config(_without_hydra(cfg))


def settle_run_dir(cfg: DictConfig) -> None:
    """Single run: make ``run_dir`` and ``hydra.run.dir`` one folder, before Hydra creates it.

    ``run_dir=...`` wins; else an explicit ``hydra.run.dir=...``; else ``ckpt_path=last``
    resumes the latest ``runs/<task>/*``; else ``hydra.run.dir`` (``runs/<task>/<time>``).
    """
    with read_write(cfg), open_dict(cfg):
        if cfg.run_dir is None and _overridden(cfg, "hydra.run.dir"):
            cfg.run_dir = str(cfg.hydra.run.dir)
        if cfg.run_dir is not None:  # absolute, as Hydra's output_dir (and hydra.job.chdir)
            cfg.run_dir = os.path.abspath(cfg.run_dir)
        assign_run_dir(cfg, default=os.path.abspath(str(cfg.hydra.run.dir)))
    with read_write(cfg.hydra):
        cfg.hydra.run.dir = str(cfg.run_dir)


def check_sweep(hydra: Any, cfg: DictConfig) -> None:
    """Compose and validate every job of a sweep before the first one starts."""
    if cfg.get("run_dir") is not None:
        raise ConfigError(
            f"run_dir={cfg.run_dir!r} with --multirun: every job writes to its own folder "
            "hydra.sweep.dir/<job number> (default runs/<task>/multirun/<time>/<n>); "
            "set hydra.sweep.dir=... instead"
        )
    if cfg.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return  # another sweeper draws its own jobs; each is validated when it starts
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    # What BasicSweeper.sweep expands: hydra.sweeper.params, then the command-line overrides.
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
    parser = OverridesParser.create(config_loader=hydra.config_loader)
    parsed = _composing(lambda: parser.parse_overrides([*params, *cfg.hydra.overrides.task]))
    for batch in BasicSweeper.split_arguments(parsed, None):
        for job_overrides in batch:
            job = _composing(lambda o=job_overrides: hydra.config_loader.load_sweep_config(cfg, o))
            with read_write(job), open_dict(job):
                if job.get("ckpt_path") == "last":  # the job's own folder: checked when it starts
                    job.ckpt_path = None
            _validate_job(job)


def _quoted(value: str) -> str:
    """A string as a quoted Hydra override value."""
    return "'" + value.replace("'", "\\'") + "'"


@contextlib.contextmanager
def ddp_children_argv(command: str, launch_args: list[str], run_dir: str) -> Iterator[None]:
    """``sys.argv`` for the processes Lightning relaunches (``python -m scm_lightning`` + argv).

    A child re-runs this job alone: the same command, ``--config-dir``/``--config-name``, the
    job's own overrides (never the sweep, never ``-m``) and its ``run_dir``.
    """
    from hydra.core.hydra_config import HydraConfig

    saved = sys.argv
    overrides = [str(o) for o in HydraConfig.get().overrides.task]
    sys.argv = [saved[0], command, *launch_args, *overrides, f"run_dir={_quoted(run_dir)}"]
    try:
        yield
    finally:
        sys.argv = saved


@contextlib.contextmanager
def sweep_job_process_state() -> Iterator[None]:
    """A sweep runs its jobs one after another in this process: what a DDP job leaves behind
    (its process group, the MASTER_PORT/WORLD_SIZE/... Lightning put in ``os.environ``) is
    cleared, so the next job starts its own group and children."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def write_run_record(cfg: DictConfig, subdir: str) -> Path:
    """``<run_dir>/<subdir>/{config,hydra,overrides}.yaml``, as Hydra's run_job writes them."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
    with read_write(hydra_cfg.hydra):
        hydra_cfg.hydra.output_subdir = subdir
    out = Path(hydra_cfg.hydra.runtime.output_dir) / subdir
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(hydra_cfg, out / "hydra.yaml")
    OmegaConf.save(hydra_cfg.hydra.overrides.task, out / "overrides.yaml")
    return out


class RunLogFile(logging.FileHandler):
    """Hydra's job log file (``<run_dir>/<task>.log``), written from the moment the run's inputs
    passed their checks: records before that are held and written then, so a rejected input
    leaves an existing run's log untouched (``hydra.job_logging.handlers.file.class``)."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None) -> None:
        super().__init__(filename, mode, encoding, delay=True)
        self._held: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self._held is not None:
            self._held.append(record)
        else:
            super().emit(record)

    def start(self) -> None:
        held, self._held = self._held or [], None
        for record in held:
            super().emit(record)


def start_run_logs() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogFile):
            handler.start()


def show_config(cfg: DictConfig) -> None:
    """The composed config, highlighted, on stderr (rank 0)."""
    if _is_rank_zero():
        from rich.console import Console
        from rich.syntax import Syntax

        Console(stderr=True).print(Syntax(OmegaConf.to_yaml(cfg), "yaml", theme="ansi_dark"))


class TrainingJob:
    """The task function Hydra runs for each job: settle ``run_dir``, then ``training.run``.

    Args:
        command: ``fit`` or ``pretrain`` (the CLI subcommand).
        launch_args: ``--config-dir``/``--config-name`` as given (DDP children need them).
        record_subdir: single run: where to write the ``.hydra`` record once the checks passed
            (Hydra's own record is switched off for it); ``None`` when Hydra writes it.
    """

    def __init__(self, command: str, launch_args: list[str], record_subdir: str | None) -> None:
        self.command = command
        self.launch_args = launch_args
        self.record_subdir = record_subdir
        self.error: BaseException | None = None  # the job's error (run_job keeps, not raises it)

    def __call__(self, cfg: DictConfig) -> dict[str, Any]:
        try:
            return self._run(cfg)
        except BaseException as err:
            self.error = err
            raise

    def _run(self, cfg: DictConfig) -> dict[str, Any]:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        sweep = hydra_cfg.mode == RunMode.MULTIRUN
        if sweep:
            with open_dict(cfg):
                cfg.run_dir = hydra_cfg.runtime.output_dir
            assign_run_dir(cfg)  # ckpt_path=last: this job's own last.ckpt
        record = copy.deepcopy(cfg)

        def on_ready() -> None:
            start_run_logs()
            if self.record_subdir is not None and _is_rank_zero():
                write_run_record(record, self.record_subdir)
            show_config(cfg)

        from scm_lightning.training import run

        with contextlib.ExitStack() as job:
            if sweep:
                job.enter_context(sweep_job_process_state())
            job.enter_context(ddp_children_argv(self.command, self.launch_args, str(cfg.run_dir)))
            return run(cfg, on_ready=on_ready)


def _launch_args(args: Any) -> list[str]:
    out = []
    if args.config_dir is not None:
        out += ["--config-dir", str(Path(args.config_dir).absolute())]
    if args.config_name is not None:
        out += ["--config-name", args.config_name]
    return out


def _run(hydra: Any, command: str, config_name: str, overrides: list[str], args: Any) -> None:
    """Hydra.run, with the checks first and the run record after training.run's checks."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import run_job
    from hydra.types import HydraContext, RunMode

    cfg = _composing(
        lambda: hydra.compose_config(
            config_name=config_name, overrides=overrides, run_mode=RunMode.RUN
        )
    )
    if cfg.hydra.mode is None:
        cfg.hydra.mode = RunMode.RUN
    settle_run_dir(cfg)
    _validate_job(cfg)
    run_dir = Path(str(cfg.run_dir))
    new_folders = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # deepest first
    record_subdir = cfg.hydra.output_subdir
    with read_write(cfg.hydra):
        cfg.hydra.output_subdir = None  # written by TrainingJob once the inputs are checked
    callbacks = Callbacks(cfg)
    callbacks.on_run_start(config=cfg, config_name=config_name)
    job = TrainingJob(command, _launch_args(args), record_subdir)
    ret = run_job(
        hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=callbacks),
        task_function=job,
        config=cfg,
        job_dir_key="hydra.run.dir",
        job_subdir_key=None,
    )
    callbacks.on_run_end(config=cfg, config_name=config_name, job_return=ret)
    if job.error is not None:  # (ret.return_value would also print Hydra's report line)
        for folder in new_folders:  # a rejected input leaves no empty folders behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise job.error


def _parser(command: str) -> Any:
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.prog = f"python -m scm_lightning {command}"

    def error(message: str) -> None:
        raise ConfigError(f"{parser.prog}: {message} (--help lists the options)")

    parser.error = error  # type: ignore[method-assign]
    return parser


def main(command: str, argv: Sequence[str]) -> int:
    """``python -m scm_lightning <command> [Hydra flags] [overrides]``; errors are raised."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    parser = _parser(command)
    args = parser.parse_args(hydra_argv(argv))
    if args.config_path is not None:
        raise ConfigError(
            "--config-path: the config directory is the packaged conf/; add your own config "
            "groups and options with --config-dir <dir>"
        )
    if args.experimental_rerun is not None:
        raise ConfigError(
            "--experimental-rerun is not supported: rerun with the overrides in "
            "<run_dir>/.hydra/overrides.yaml"
        )
    config_name = args.config_name or command
    version.setbase(HYDRA_VERSION_BASE)
    register_resolvers()
    search_path = create_config_search_path(f"file://{conf_dir()}")
    if args.config_dir is not None:
        config_dir = Path(args.config_dir).absolute()
        if not config_dir.is_dir():
            raise ConfigError(f"--config-dir {args.config_dir!r}: no such directory")
        search_path.prepend(  # as Hydra does: after the packaged conf/, before structured configs
            provider="command-line",
            path=f"file://{config_dir}",
            anchor=SearchPathQuery(provider="schema"),
        )
    hydra = Hydra.create_main_hydra2(task_name=command, config_search_path=search_path)
    try:
        if args.help:
            _composing(
                lambda: hydra.app_help(config_name=config_name, args_parser=parser, args=args)
            )
            return 0
        if args.hydra_help:
            hydra.hydra_help(config_name=config_name, args_parser=parser, args=args)
            return 0
        if args.resolve and args.cfg is None:
            raise ConfigError("--resolve goes with --cfg or --help")
        actions = (
            args.run
            + (args.cfg is not None)
            + args.multirun
            + args.shell_completion
            + (args.info is not None)
        )
        if actions > 1:
            raise ConfigError("only one of --run, --multirun, --cfg, --info, --shell-completion")
        overrides = list(args.overrides)
        if args.cfg is not None:
            _composing(
                lambda: hydra.show_cfg(
                    config_name=config_name,
                    overrides=overrides,
                    cfg_type=args.cfg,
                    package=args.package,
                    resolve=args.resolve,
                )
            )
            return 0
        if args.shell_completion:
            hydra.shell_completion(config_name=config_name, overrides=overrides)
            return 0
        if args.info is not None:
            _composing(
                lambda: hydra.show_info(args.info, config_name=config_name, overrides=overrides)
            )
            return 0
        # The mode: -m, or hydra.mode in the config (as Hydra's _run_app decides it).
        mode = hydra.get_mode(config_name=config_name, overrides=overrides)
        if mode is None or (args.multirun and mode == RunMode.RUN):
            mode = RunMode.MULTIRUN if args.multirun else RunMode.RUN
            overrides.append(f"hydra.mode={mode.name}")
        if mode == RunMode.RUN:
            _run(hydra, command, config_name, overrides, args)
            return 0
        multirun_cfg = _composing(
            lambda: hydra.compose_config(
                config_name=config_name,
                overrides=overrides,
                run_mode=RunMode.MULTIRUN,
                with_log_configuration=False,
            )
        )
        check_sweep(hydra, multirun_cfg)
        task = TrainingJob(command, _launch_args(args), record_subdir=None)
        hydra.multirun(config_name=config_name, task_function=task, overrides=overrides)
        return 0
    finally:
        GlobalHydra.instance().clear()
