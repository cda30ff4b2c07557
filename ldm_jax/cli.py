"""What every entry point shares: flag parsing into a private FlagValues, config building
from --stage/--preset/--config.* , one-line errors with exit status 2, JAX start-up."""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

import jax
from absl import flags
from ml_collections import config_flags

from ldm_jax import configs


class UsageError(ValueError):
    """Bad input from the user; reported as one line, exit status 2."""


def fail(prog: str, msg: object) -> NoReturn:
    lines = str(msg).strip().splitlines() or [repr(msg)]
    print(f"{prog}: error: {lines[0]}", file=sys.stderr)
    sys.exit(2)


def parse_flags(prog: str, argv: list[str], define: Callable[[flags.FlagValues], None],
                with_config: bool = False) -> flags.FlagValues:
    """Defines flags on a fresh FlagValues (no global state), parses argv, handles --help."""
    fv = flags.FlagValues()
    flags.DEFINE_bool("help", False, "Show this help and exit.", flag_values=fv, short_name="h")
    define(fv)
    try:
        if with_config:  # config_flags reads the --config.* overrides from sys.argv here
            config_flags.DEFINE_config_dict(
                "config", configs.union_config(),
                "Override any config field: --config.optim.lr=3e-4 (see ldm_jax/configs.py).",
                flag_values=fv, lock_config=True)
        fv(argv)
    except (AttributeError, KeyError) as e:
        fail(prog, f"unknown config key: {str(e).strip(chr(34) + chr(39))}")
    except flags.Error as e:
        fail(prog, e)
    if fv.help:
        print((sys.modules["__main__"].__doc__ or prog).strip() + "\n")
        print(fv.get_help())
        sys.exit(0)
    return fv


def build_config(fv: flags.FlagValues):
    """get_config(stage, preset) + the --config.* overrides the user typed, validated."""
    config = configs.get_config(fv.stage, fv.preset)
    configs.apply_overrides(config, config_flags.get_override_values(fv["config"]))
    configs.validate(config)
    return config


def require(fv: flags.FlagValues, *names: str) -> None:
    for name in names:
        if fv[name].value in (None, ""):
            raise UsageError(f"--{name} is required")


def setup_jax() -> None:
    """Persistent compilation cache (start-up drops from tens of seconds to a few)."""
    cache = os.environ.get("LDM_JAX_CACHE", os.path.expanduser("~/.cache/ldm_jax/xla"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
