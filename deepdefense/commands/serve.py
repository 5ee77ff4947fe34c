"""``deepdefense serve``: the defended HTTP server. Its flags are made from ``ServerSettings``' fields
(name, type, default, description), so a flag's help can never disagree with the setting it sets."""

from __future__ import annotations

import argparse

from deepdefense import flags
from deepdefense.server.settings import ServerSettings

HELP = "serve a victim model through a defense over HTTP (FastAPI under uvicorn; --replicas: on Ray Serve)"
DESCRIPTION = (
    "Every flag overrides its DD_* environment variable (see docs/server.md). API keys are read only "
    "from DD_API_KEYS or the file named by DD_API_KEYS_FILE (operator keys: DD_ADMIN_KEYS[_FILE]), "
    "never from a flag, so that they stay out of process listings and shell history."
)

#: Settings that are environment-only: keys and the files holding them.
ENVIRONMENT_ONLY = ("api_keys", "api_keys_file", "admin_keys", "admin_keys_file")


def add_arguments(p: argparse.ArgumentParser) -> None:
    for name, field in ServerSettings.model_fields.items():
        if name in ENVIRONMENT_ONLY:
            continue
        if name == "engine":  # a dict: the shared KEY=VALUE syntax, merged over DD_ENGINE
            flags.add_engine_options(p, " (merged over DD_ENGINE)")
            continue
        default = field.get_default(call_default_factory=True)
        shown = "none" if default is None else ",".join(default) if isinstance(default, list) else default
        help_text = f"{field.description or name.replace('_', ' ')} (default: {shown}; env DD_{name.upper()})"
        p.add_argument(f"--{name.replace('_', '-')}", default=None, help=help_text, **flags.flag_kind(field.annotation))


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The flags given, over the ``DD_*`` environment, over the defaults."""
    overrides = {
        k: v for k, v in vars(args).items() if k in ServerSettings.model_fields and k != "engine" and v is not None
    }
    settings = ServerSettings(**overrides)
    if args.engine:
        settings = ServerSettings(**overrides, engine={**settings.engine, **flags.engine_options(args.engine)})
    return settings


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if settings.replicas is not None:  # Ray Serve replicas (docs/scaling.md); Ray is imported only here
        from deepdefense.server.cluster import serve_replicas

        serve_replicas(settings)
        return 0
    from deepdefense.server.app import serve

    serve(settings)
    return 0
