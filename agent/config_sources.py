"""Where config values come from: pydantic-settings sources that note who set each value.

In rising precedence: the PREFECT_* variables a Prefect client reads (fallbacks only), systemd
credentials, the main TOML file and then `agent.d/*.toml` next to it in lexical order, and
`RUNNER_AGENT_<SECTION>__<KEY>` variables. Tables deep-merge; a `[[deployment]]` is appended,
or replaces an earlier one of the same name. Every source reads only the path and environment
mapping it is given, never os.environ, and notes the origin of each value, so that an error
names the file, drop-in or variable the user has to fix. settings.py validates.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
)

from agent.config_errors import ConfigError, Loc, one_line, show
from agent.config_files import check_document, check_value, dropins, read_secret, read_toml

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigSources",
    "CredentialsSource",
    "EnvironmentSource",
    "Origins",
    "PrefectVariablesSource",
    "TomlFilesSource",
    "one_line",
]

DEFAULT_CONFIG = Path("/etc/runner-agent/agent.toml")
ENV_PREFIX = "RUNNER_AGENT_"
SECTIONS = ("api", "agent", "flow_run")
# The secrets of [api], and the variable a Prefect client would take each from.
PREFECT_SECRETS = {"key": "PREFECT_API_KEY", "auth_string": "PREFECT_API_AUTH_STRING"}


class Origins:
    """Who set each path (table keys, array indices) of one source's data.

    Every path is noted, so a value's origin is exact even where several files or variables
    added to one table; a table's own origin is the last one that added to it.
    """

    def __init__(self) -> None:
        self._by_path: dict[Loc, str] = {}

    def get(self, loc: Loc) -> str | None:
        return self._by_path.get(loc)

    def table(self, loc: Loc, source: str) -> None:
        """`source` added keys to the table at `loc`."""
        self._by_path[loc] = source

    def value(self, loc: Loc, value: Any, source: str) -> None:
        """`source` set `value` at `loc`, replacing whatever was there."""
        if loc in self._by_path:
            for path in [p for p in self._by_path if p[: len(loc)] == loc]:
                del self._by_path[path]
        self._note(loc, value, source)

    def _note(self, loc: Loc, value: Any, source: str) -> None:
        self._by_path[loc] = source
        if isinstance(value, dict):
            for key, item in value.items():
                self._note((*loc, key), item, source)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                self._note((*loc, index), item, source)


class TomlFilesSource(PydanticBaseSettingsSource):
    """The main file, then the drop-ins of `agent.d/` next to it, each read safely."""

    def __init__(
        self, settings_cls: type[BaseSettings], config_path: Path | None, environ: Mapping[str, str]
    ) -> None:
        super().__init__(settings_cls)
        explicit = config_path is not None or bool(environ.get("RUNNER_AGENT_CONFIG"))
        path = config_path or Path(environ.get("RUNNER_AGENT_CONFIG") or DEFAULT_CONFIG)
        self.main_file = str(path)
        self.files: list[str] = []
        self.data: dict[str, Any] = {}
        self.origins = Origins()
        for file in (path, *dropins(path.parent / "agent.d")):
            # A missing default file is fine (built-in defaults apply); a named one is an error.
            document = read_toml(file, required=explicit or file != path)
            if document is not None:
                self._add_file(document, str(file))

    @property
    def deployments(self) -> list[Any]:
        """The raw `[[deployment]]` tables, in order (to name one in an error)."""
        items: list[Any] = self.data.get("deployment", [])
        return items

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self.data

    def _add_file(self, document: dict[str, Any], source: str) -> None:
        self.files.append(source)
        check_document(document, source)
        for top, value in document.items():
            if top == "deployment":
                self._add_deployments(value, source)
            elif top == "work_pool":
                self._add_work_pools(value, source)
            elif top not in SECTIONS:
                raise ConfigError(
                    source,
                    top,
                    "unknown key (sections: api, agent, flow_run, deployment, work_pool)",
                )
            elif not isinstance(value, dict):
                raise ConfigError(source, top, f"expected a table [{top}], got {show(value)}")
            else:
                self.origins.table((top,), source)
                self._merge(self.data.setdefault(top, {}), value, (top,), source)

    def _merge(self, target: dict[str, Any], new: Mapping[str, Any], loc: Loc, source: str) -> None:
        for key, value in new.items():
            path = (*loc, key)
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                self.origins.table(path, source)
                self._merge(target[key], value, path, source)
            else:
                target[key] = copy.deepcopy(value)
                self.origins.value(path, value, source)

    def _add_deployments(self, items: Any, source: str) -> None:
        seen: set[tuple[Any, str]] = set()
        for item in self._tables("deployment", items, source):
            name = item.get("name")
            identity = None
            if isinstance(name, str):
                # Prefect's identity: FLOW/NAME (flow_name defaults to name).
                flow_name = item.get("flow_name", name)
                # A flow_name that is no string is validation's to report, not a crash here.
                identity = (flow_name if isinstance(flow_name, str) else name, name)
                label = name if identity[0] == name else f"{identity[0]}/{name}"
                if identity in seen:
                    raise ConfigError(
                        source,
                        f"deployment[{label}]",
                        f"duplicate deployment name {name!r}; names must be unique per flow "
                        f"(both [[deployment]]s have flow_name {identity[0]!r})",
                    )
                seen.add(identity)
            self._put(
                "deployment",
                item,
                identity,
                lambda d: (d.get("flow_name", d.get("name")), d.get("name")),
                source,
            )

    def _add_work_pools(self, items: Any, source: str) -> None:
        seen: set[str] = set()
        for item in self._tables("work_pool", items, source):
            name = item.get("name")
            if isinstance(name, str):
                if name in seen:
                    raise ConfigError(
                        source, f"work_pool[{name}]", f"duplicate work pool {name!r} in one file"
                    )
                seen.add(name)
            identity = name if isinstance(name, str) else None
            self._put("work_pool", item, identity, lambda p: p.get("name"), source)

    def _tables(self, top: str, items: Any, source: str) -> list[dict[str, Any]]:
        """A file's `[[top]]` array, which must hold tables only."""
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise ConfigError(source, top, f"expected [[{top}]] tables")
        self.origins.table((top,), source)
        return items

    def _put(
        self,
        top: str,
        item: dict[str, Any],
        identity: Hashable | None,
        identity_of: Callable[[dict[str, Any]], Hashable],
        source: str,
    ) -> None:
        """`item` into the merged `[[top]]` array: in place of an earlier file's table of the
        same identity, else (or without one) at the end."""
        existing: list[dict[str, Any]] = self.data.setdefault(top, [])
        index = next(
            (
                i
                for i, table in enumerate(existing)
                if identity is not None and identity_of(table) == identity
            ),
            len(existing),
        )
        if index == len(existing):
            existing.append(item)
        else:
            existing[index] = item
        self.origins.value((top, index), item, source)


class EnvironmentSource(EnvSettingsSource):
    """`RUNNER_AGENT_<SECTION>__<KEY>` variables from the mapping given, not from os.environ.

    pydantic-settings splits the names at `__` and decodes an `env` table given as a JSON
    object; `RUNNER_AGENT_FLOW_RUN__ENV__NAME=value` sets one entry. What it would let pass or
    report without naming the variable is checked first, in the variables' sorted order: an
    unknown section or sub-key, text that is not UTF-8 or holds a NUL, an `env` that is not a
    JSON object. Section and key match in any case; the NAME after `ENV__` keeps its own.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self.origins = Origins()
        self._variables = self._checked(environ)
        super().__init__(
            settings_cls,
            case_sensitive=True,  # the names are normalised by _checked
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
            env_nested_max_split=2,  # `ENV__A__B` names the variable A__B
        )

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return self._variables

    def _checked(self, environ: Mapping[str, str]) -> dict[str, str | None]:
        variables: dict[str, str | None] = {}
        for name in sorted(environ):
            section, sep, rest = name.removeprefix(ENV_PREFIX).partition("__")
            if not name.startswith(ENV_PREFIX) or not sep:
                continue  # e.g. RUNNER_AGENT_CONFIG and RUNNER_AGENT_LOG_LEVEL are not config keys
            source = f"environment ({name})"
            section = section.lower()
            if section not in SECTIONS:
                raise ConfigError(
                    source,
                    None,
                    f"unknown section {section!r} (use API, AGENT or "
                    "FLOW_RUN; [[deployment]] can only be set in files)",
                )
            key, sep, sub = rest.partition("__")
            key = key.lower()
            text = environ[name]
            check_value(text, source, f"{section}.{key}")
            normalised = f"{ENV_PREFIX}{section}__{key}"
            self.origins.table((section,), source)
            if sep and key == "env":
                normalised += f"__{sub}"
                self.origins.table((section, key), source)
                self.origins.value((section, key, sub), text, source)
            elif sep:
                raise ConfigError(source, f"{section}.{key}", f"unknown key {sub.lower()!r}")
            elif key == "env":
                table = _json_object(text, source, f"{section}.env")
                # What JSON escapes (NUL, lone surrogates) or nests is held to the files' rules.
                check_value(table, source, f"{section}.env")
                self.origins.value((section, key), table, source)
            else:
                self.origins.value((section, key), text, source)
            variables[normalised] = text
        return variables


def _json_object(text: str, source: str, key: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise ConfigError(source, key, 'expected a JSON object like {"NAME": "value"}')
    return value


class _SystemdCredentials(BaseSettings):
    """The [api] secrets as systemd credentials (`LoadCredential=api-key:...`), by file name."""

    key: str | None = Field(default=None, validation_alias="api-key")
    auth_string: str | None = Field(default=None, validation_alias="auth-string")


class CredentialsSource(SecretsSettingsSource):
    """systemd credentials in $CREDENTIALS_DIRECTORY, for an [api] secret that no higher source
    set, neither itself nor as a *_file.

    pydantic-settings finds the files; they are read here, as every secret file is (a regular
    file, at most 64 KiB, one line, not empty). A credential that cannot be read is kept in
    `failures`: load_settings raises it once the config itself is known to be valid.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        directory = environ.get("CREDENTIALS_DIRECTORY")
        super().__init__(_SystemdCredentials, secrets_dir=directory or None, case_sensitive=True)
        self._directory = Path(directory) if directory else None
        self.origins = Origins()
        self.failures: dict[str, ConfigError] = {}

    def __call__(self) -> dict[str, Any]:
        # No directory is no credential (the base class would warn, or raise for a file).
        if self._directory is None or not self._directory.is_dir():
            return {}
        by_alias = super().__call__()  # keyed by credential name
        fields = _SystemdCredentials.model_fields.items()
        names = {field.validation_alias: key for key, field in fields}
        api = {names[alias]: value for alias, value in by_alias.items()}
        return {"api": api} if api else {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        api = self.current_state.get("api")
        taken = isinstance(api, dict) and (field_name in api or f"{field_name}_file" in api)
        if taken or self._directory is None:
            return None, field_name, False
        for _, name, _ in self._extract_field_info(field, field_name):
            path = self._directory / name
            if not path.exists():
                continue
            try:
                text = read_secret(path, str(path), None)
            except ConfigError as exc:
                self.failures[field_name] = exc
                return None, field_name, False
            self.origins.value(("api", field_name), text, f"systemd credential {name!r}")
            return text, field_name, False
        return None, field_name, False


class PrefectVariablesSource(PydanticBaseSettingsSource):
    """PREFECT_API_URL, PREFECT_API_KEY and PREFECT_API_AUTH_STRING, as a Prefect client would
    read them, for an [api] key that no higher source set (nor, for a secret, gave a file for)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._environ = environ
        self.origins = Origins()

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # only ever [api] keys: see __call__

    def __call__(self) -> dict[str, Any]:
        api = self.current_state.get("api")
        taken = set(api) if isinstance(api, dict) else set()
        found: dict[str, str] = {}
        url = self._environ.get("PREFECT_API_URL")
        if "url" not in taken and url:
            check_value(url, "environment (PREFECT_API_URL)", "api.url")
            found["url"] = url
            self.origins.value(("api", "url"), url, "environment (PREFECT_API_URL)")
        for key, variable in PREFECT_SECRETS.items():
            value = self._environ.get(variable, "").strip()
            if value and not taken & {key, f"{key}_file"}:
                found[key] = value
                self.origins.value(("api", key), value, f"environment ({variable})")
        return {"api": found} if found else {}


class ConfigSources:
    """The sources of one load, and where each value came from.

    They are built in the order errors are reported: the files first, then the variables.
    """

    def __init__(
        self, settings_cls: type[BaseSettings], config_path: Path | None, environ: Mapping[str, str]
    ) -> None:
        self.files = TomlFilesSource(settings_cls, config_path, environ)
        self.environment = EnvironmentSource(settings_cls, environ)
        self.credentials = CredentialsSource(environ)
        self.prefect = PrefectVariablesSource(settings_cls, environ)

    @property
    def by_precedence(self) -> tuple[PydanticBaseSettingsSource, ...]:
        """Highest first, as pydantic-settings takes them."""
        return (self.environment, self.files, self.credentials, self.prefect)

    def origin(self, loc: Loc) -> str | None:
        """The source that set the value at `loc`, or else the nearest table above it."""
        sources = (self.environment, self.files, self.credentials, self.prefect)
        for end in range(len(loc), 0, -1):
            for source in sources:
                found = source.origins.get(loc[:end])
                if found is not None:
                    return found
        return None
