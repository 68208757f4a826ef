"""The monitor's configuration files: TOML or YAML read whole, and channels' secret files.

Errors name the file and the line, never the text (a config line may hold a secret).

Imports: gradwatch.common only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradwatch.common.errors import ConfigError, missing_dependency

__all__ = ["anchor_secret_files", "parse_toml", "parse_yaml", "read_file", "read_secret_file"]


def read_file(file: Path) -> dict[str, Any]:
    suffix = file.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"The monitor config must be a .toml, .yaml or .yml file, got "
                          f"{file.name!r}; rename it or convert it (see docs: example config).")
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"Cannot read the monitor config {file}: {exc.strerror or exc}. "
                          f"Check the path (or GRADWATCH_CONFIG) and its permissions.") from None
    data = parse_toml(text, file) if suffix == ".toml" else parse_yaml(text, file)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"The monitor config {file} must hold a table of settings at the top "
                          f"level, got {type(data).__name__}; start with e.g. experiments = […].")
    return data


def parse_toml(text: str, file: Path) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]
        except ModuleNotFoundError:
            raise missing_dependency("a TOML monitor config on Python 3.10", "tomli",
                                     "monitor") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # says line and column, never the text
        raise ConfigError(f"The monitor config {file} is not valid TOML: {exc}. Fix that "
                          f"line; strings need quotes, e.g. url_env = \"SLACK_URL\".") from None


def parse_yaml(text: str, file: Path) -> Any:
    try:
        import yaml
    except ModuleNotFoundError:
        raise missing_dependency("a YAML monitor config", "PyYAML", "yaml") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # str(exc) quotes the offending line, which may hold a secret: keep the position only.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"The monitor config {file} is not valid YAML{where}: {problem}. "
                          f"Fix that line, or use TOML.") from None


def anchor_secret_files(data: dict[str, Any], directory: Path) -> None:
    """Make each relative ``url_file`` in the file relative to the file's directory."""
    channels = data.get("channels")
    if not isinstance(channels, dict):
        return
    for spec in channels.values():
        if isinstance(spec, dict) and isinstance(spec.get("url_file"), str):
            secret = Path(spec["url_file"]).expanduser()
            if "://" not in spec["url_file"] and not secret.is_absolute():
                spec["url_file"] = str((directory / secret).absolute())


def read_secret_file(file: Path) -> str:
    try:
        value = file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read url_file {file}: {exc.strerror or exc}; create it "
                          f"with the channel's URL, readable by the monitor.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"url_file {file} is not UTF-8 text; it should hold one URL.") from None
    if not value:
        raise ConfigError(f"url_file {file} is empty; write the channel's URL into it.")
    return value
