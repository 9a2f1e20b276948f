"""``python -m scm_lightning <command> [--debug] [key=value ...]`` (Hydra overrides).

Commands: ``fit`` (sCD/sCT distillation), ``pretrain`` (TrigFlow diffusion training or
teacher preparation), ``sample``, ``evaluate``, ``export``. A bad input stops with one line
on stderr and exit code 2; a crash during training (including a run stopped after
``max_bad_steps`` non-finite steps) one line and exit code 1; ``--debug`` (or
``HYDRA_FULL_ERROR=1``) shows the traceback. See docs/validation.md.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

USAGE = """\
usage: python -m scm_lightning {fit,pretrain,sample,evaluate,export} [--debug] [--cfg]
                              [key=value ...]
       python -m scm_lightning {fit,pretrain} [-m] [--help] [--config-dir DIR] [key=value ...]

  fit       distill a teacher into a 1-2 step consistency model (sCD, or sCT with loss=sct)
  pretrain  train a TrigFlow diffusion teacher (or prepare an existing one: prepare_from=...)
  sample    checkpoint or exported folder -> PNG grid and .npz
  evaluate  FD/KID/precision/recall of a student at several NFEs and of its teacher
  export    checkpoint + EMA profile -> a diffusers folder (SCMScheduler + pipeline)

  --cfg     print the composed config and exit     --debug  show full tracebacks
  fit and pretrain are Hydra apps: `fit --help` lists config groups and options, `-m` sweeps
  (fit -m optim.lr=1e-4,5e-5), hydra.run.dir= / hydra.sweep.dir= choose the run folders.
  With no overrides, `fit` distills the bundled digits teacher on a CPU in a few minutes.
"""

EXIT_BAD_INPUT = 2
EXIT_RUNTIME = 1


def _run_training(task: str, args: list[str]) -> int:
    from scm_lightning import hydra_app

    return hydra_app.main(task, args)  # Hydra's flags (-m, --cfg, --help, ...) and overrides


def _run_tool(task: str, args: list[str]) -> int:
    from scm_lightning import commands

    overrides = [a for a in args if a != "--cfg"]
    return commands.main(task, overrides, print_cfg=len(overrides) < len(args))


COMMANDS: dict[str, Callable[[str, list[str]], int]] = {
    "fit": _run_training,
    "pretrain": _run_training,
    "sample": _run_tool,
    "evaluate": _run_tool,
    "export": _run_tool,
}


def one_line(err: BaseException) -> str:
    """An error as one line: Hydra's and OmegaConf's messages trimmed to their point."""
    text = str(err).strip() or type(err).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type="))] or [text]
    # Hydra wraps the real error on the next line ("Error in call to target ...:\nValueError(...)").
    message = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return f"{message} [config key: {key}]" if key else message


def is_bad_input(err: BaseException) -> bool:
    """Errors that mean "your input is wrong" (exit 2, no traceback) vs a crash (exit 1).

    ``training.run`` marks an error raised after the first training step with
    ``bad_input=False``: from then on a ValueError is a crash, not a bad input.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from scm_lightning.config import ConfigError

    if isinstance(err, ConfigError):
        return True
    flag = getattr(err, "bad_input", None)
    if flag is not None:
        return bool(flag)
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        return True
    if "lightning" in sys.modules:  # Lightning's own "your Trainer arguments are wrong"
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        if isinstance(err, MisconfigurationException):
            return True
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return True
    return isinstance(err, (ValueError, KeyError, TypeError))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("HYDRA_FULL_ERROR") == "1"
    args = [a for a in args if a != "--debug"]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else EXIT_BAD_INPUT
    command, overrides = args[0], args[1:]
    if command not in COMMANDS:
        print(
            f"error: unknown command {command!r}; expected one of {sorted(COMMANDS)}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        return COMMANDS[command](command, overrides)
    except KeyboardInterrupt:
        print("interrupted; checkpoints written so far are intact", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if is_bad_input(err):
            print(f"error: {one_line(err)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        # A crash (or a diverged run): still one line; the traceback is one flag away.
        print(
            f"error ({type(err).__name__}): {one_line(err)} [--debug shows the traceback]",
            file=sys.stderr,
        )
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
