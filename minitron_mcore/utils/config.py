"""The commands' configuration files: where ``conf/`` is, and composing ``conf/<command>.yaml``
with Hydra overrides into the command's dataclass (the CLI and the pipeline's reproduction
command lines both need it; model presets need ``conf/model/``)."""

from __future__ import annotations

import os
import re

from minitron_mcore.errors import MinitronError


def conf_dir() -> str:
    """The project's ``conf/`` directory (installed as the ``minitron_mcore.conf`` package)."""
    import importlib.util

    spec = importlib.util.find_spec("minitron_mcore.conf")
    if spec and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo, "conf")


def compose_config(command: str, schema: type, overrides: list[str]):
    """Hydra-compose ``conf/<command>.yaml`` (built on the dataclass ``schema``) with
    ``overrides``; a bad key or value is one error line naming the command's ``--help``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    # `pipeline.from.<stage>=PATH`: `from` is a Python keyword, so the field is `from_`.
    overrides = [re.sub(r"^\+*pipeline\.from\.", "++pipeline.from_.", o) for o in overrides]
    schema_name = f"{command.replace('-', '_')}_schema"
    ConfigStore.instance().store(name=schema_name, node=schema)
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            cfg = hydra_compose(config_name=command, overrides=overrides)
        return OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        chain, err = [], e
        while err is not None:  # Hydra wraps OmegaConf's precise error as __cause__
            chain.append(str(err).strip().splitlines()[0] if str(err).strip() else "")
            err = err.__cause__
        unknown = re.search(r"Key '([^']+)' is not in struct", " ".join(map(str, chain)))
        if unknown or "Could not override" in chain[0]:
            key = unknown.group(1) if unknown else chain[0].split("'")[1]
            first = f"unknown key {key!r}"
        else:
            first = "; ".join(c for c in chain if c)
        raise MinitronError(
            f"bad configuration for `{command}`: {first}; see `minitron {command} --help`"
        ) from e
