"""One settings model for the whole service.

Sources, lowest to highest precedence: the model's defaults, the YAML file, then environment
variables (``BIOMERO_IMPORTER_<KEY>`` for every key, plus the names the original importer read).
"""

from __future__ import annotations

import base64
import difflib
import ipaddress
import json
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import platformdirs
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "BIOMERO_IMPORTER_"
CONFIG_ENV = "BIOMERO_IMPORTER_CONFIG"
# Our own names that are not settings: the config file, and what the test suite reads (a
# developer who exports it must still be able to run the CLI in the same shell).
NOT_SETTINGS_ENV = frozenset({CONFIG_ENV, "BIOMERO_IMPORTER_TEST_DATABASE_URL"})
DEFAULT_CONFIG_PATH = Path("config/settings.yml")

# Environment names the original importer (and the NL-BIOMERO compose files) use.
LEGACY_ENV: dict[str, str] = {
    "INGEST_TRACKING_DB_URL": "ingest_tracking_db",
    "OMERO_HOST": "omero_host",
    "OMERO_USER": "omero_user",
    "OMERO_PASSWORD": "omero_password",
    "OMERO_PORT": "omero_port",
    "PODMAN_USERNS_MODE": "podman_userns_mode",
    "USE_REGISTER_ZARR": "use_register_zarr",
    "ADI_RUN_MIGRATIONS": "run_migrations",
    "PROCESSED_DATA_FOLDER": "processed_folder_name",
    "PODMAN_BIND_RETRY_ATTEMPTS": "podman_bind_retry_attempts",
    "PODMAN_BIND_RETRY_DELAY_SECONDS": "podman_bind_retry_delay_seconds",
}

# Keys the original settings.yml carried that mean nothing any more.
LEGACY_KEYS = frozenset(
    {
        "group_list",
        "data_dir_name",
        "upload_orders_dir_name",
        "failed_uploads_directory_name",
        "preprocessing",
    }
)
LEGACY_KEY_PREFIXES = ("sample_",)
# Upstream needed a manual stamp for databases without a version table; our baseline revision
# adopts such databases by itself, so this switch has nothing left to switch.
IGNORED_ENV = {
    "ADI_ALLOW_AUTO_STAMP": "existing tables are adopted automatically by the baseline migration",
}

_URL_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+asyncpg")


class SettingsError(Exception):
    """A configuration problem, worded as the one line an admin needs to fix it."""


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("biomero-importer", appauthor=False))


def normalise_db_url(url: str) -> str:
    """Accept every scheme the BIOMERO stack writes and return a plain ``postgresql://`` URL."""
    parts = urlsplit(url.strip())
    if parts.scheme not in _URL_SCHEMES:
        raise ValueError(
            f"unsupported database URL scheme '{parts.scheme}'"
            f" (use one of: {', '.join(s + '://' for s in _URL_SCHEMES)})"
        )
    return urlunsplit(("postgresql", *parts[1:]))


def mask_db_url(url: str) -> str:
    """The URL with its password replaced, safe for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", *parts[2:]))


def webhook_keys(secrets: str) -> list[bytes]:
    """The HMAC keys of a space-separated list of Standard Webhooks secrets
    (``whsec_<base64>``; several at once while one is rotated). ValueError, naming no
    secret, for anything else."""
    keys = []
    for secret in secrets.split():
        if not secret.startswith("whsec_"):
            raise ValueError(
                "each webhook secret must have the form whsec_<base64> (Standard Webhooks);"
                " several, for a rotation, are separated by spaces"
            )
        try:
            key = base64.b64decode(secret[len("whsec_") :], validate=True)
        except ValueError:
            raise ValueError("a webhook secret is not valid base64 after whsec_") from None
        if len(key) < 16:
            raise ValueError("a webhook secret must hold at least 16 bytes")
        keys.append(key)
    if not keys:
        raise ValueError("no webhook secret given")
    return keys


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


PositiveFloat = Annotated[float, Field(gt=0)]


class SimulatorUser(BaseModel):
    """A simulated OMERO experimenter: the groups it may import into, and its email address
    (OMERO's Experimenter.email, where notifications to the researcher go)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    groups: list[str] = Field(default_factory=list)
    email: str | None = None


class Settings(BaseModel):
    """Every key of ``config/settings.yml``; docs/configuration.md lists them all."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    # --- database -------------------------------------------------------------------------
    ingest_tracking_db: str | None = None
    embedded_db_dir: Path = Field(default_factory=lambda: default_data_dir() / "postgres")
    run_migrations: bool = True
    database_wait: float = Field(default=60.0, ge=0)
    notify_channel: str = "biomero_importer_orders"
    db_pool_size: int = Field(default=10, ge=2, le=200)

    # --- dispatcher -----------------------------------------------------------------------
    max_workers: int = Field(default=4, ge=1, le=10_000)
    # the replica's own threads share one CPU (biomero_importer.cpus); its children do not
    one_cpu: bool = True
    # unset: no cap; a user's orders still interleave fairly with everyone else's
    max_running_per_user: int | None = Field(default=None, ge=1)
    poll_interval: PositiveFloat = 2.0
    lease_seconds: PositiveFloat = 60.0
    max_attempts: int = Field(default=1, ge=1)
    shutdown_timeout: float = Field(default=30.0, ge=0)
    worker_id: str = Field(default_factory=_default_worker_id)
    # Waits instead of failures: files still being written, and failures that pass.
    # 0: no settle check (the original's behaviour: an order starts the moment it is claimed)
    settle_seconds: float = Field(default=0.0, ge=0)
    settle_max_wait: PositiveFloat = 24 * 3600.0
    # files, folders and links one settle look reads at most (a look walks all of them)
    settle_max_entries: int = Field(default=1_000_000, ge=1)
    transient_retries: int = Field(default=5, ge=0)
    transient_backoff: PositiveFloat = 60.0
    transient_backoff_max: PositiveFloat = 3600.0
    # While a cause of those failures is down, the replica probes it (first at once, then
    # after this, doubling up to the max); orders waiting on it are due once it answers.
    dependency_probe_backoff: PositiveFloat = 5.0
    dependency_probe_backoff_max: PositiveFloat = 60.0

    # --- files ----------------------------------------------------------------------------
    base_dir: Path = Path("/data")
    import_roots: list[Path] | None = None
    storage_timeout: PositiveFloat = 120.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_file_path: Path | None = Path("logs/app.logs")
    log_format: Literal["auto", "json", "console"] = "auto"
    log_file_max_bytes: int = Field(default=50 * 1024 * 1024, ge=4096)
    log_file_backups: int = Field(default=5, ge=1, le=1000)
    order_log_dir: Path = Path("logs")

    # --- OMERO ----------------------------------------------------------------------------
    omero_backend: Literal["blitz", "simulator", "null"] = "blitz"
    omero_host: str | None = None
    omero_user: str | None = None
    omero_password: SecretStr | None = None
    omero_port: int = Field(default=4064, ge=1, le=65535)
    omero_threads: int = Field(default=8, ge=1, le=256)
    omero_retries: int = Field(default=3, ge=0)
    omero_cli: str = "omero"
    omero_managed_repository: Path = Path("/OMERO/ManagedRepository")
    ttl_for_user_conn: int = Field(default=6 * 3600 * 1000, ge=60_000)
    import_timeout: PositiveFloat = 6 * 3600.0
    # `omero import` runs again after a transient Ice error (as the original does)
    import_retry_attempts: int = Field(default=3, ge=1, le=10)
    import_retry_delay: float = Field(default=10.0, ge=0)
    import_depth: int = Field(default=4, ge=1)
    java_opts: str | None = None
    fetch_jars: str | None = None
    # never let `omero import` download OMERO.java (air-gapped sites): the jars must be there
    omero_jars_offline: bool = False
    # `omero import --encrypted=true`: the Java importer otherwise uses the unencrypted port
    omero_import_encrypted: bool = False
    # after a timed-out `omero import` is killed, wait this long before looking for what its
    # server-side import made (it may still finish)
    import_timeout_grace: float = Field(default=120.0, ge=0)
    parallel_upload_per_worker: int = Field(default=2, ge=1)
    parallel_filesets_per_worker: int = Field(default=2, ge=1)
    skip_all: bool = False
    skip_checksum: bool = False
    skip_minmax: bool = False
    skip_thumbnails: bool = False
    skip_upgrade: bool = False
    use_register_zarr: bool = False
    # omero-zarr-pixel-buffer 0.6.1 (newest release) reads NGFF 0.4 on zarr v2 only: zarr v3
    # (NGFF 0.5) stores are refused unless the server's extension is known to read them.
    omero_zarr_reads_v3: bool = False
    annotation_namespace: str = "biomero.import"
    omero_simulator_dir: Path | None = None
    omero_simulator_import_delay: float = Field(default=0.0, ge=0)
    omero_simulator_fail_pattern: str | None = None
    # user -> groups, or user -> {"groups": [...], "email": "..."}
    omero_simulator_users: dict[str, list[str] | SimulatorUser] | None = None
    # The simulator's OMERO rules, switchable per test (docs/testing.md: "The OMERO simulator").
    omero_simulator_exclusion: Literal["visible", "target"] = "visible"
    omero_simulator_failure: Literal["clean", "orphan_fileset", "partial"] = "clean"
    omero_simulator_import_seconds: float = Field(default=0.0, ge=0)
    omero_simulator_session_ttl: bool = True
    omero_simulator_connection_lost_after: int | None = Field(default=None, ge=0)

    # --- preprocessing --------------------------------------------------------------------
    container_runtime: str = "podman"
    container_runtime_args: list[str] = Field(default_factory=list)
    podman_userns_mode: str | None = None
    # a CIFS/DFS bind source that is briefly busy (statfs EBUSY): the container runs again
    podman_bind_retry_attempts: int = Field(default=3, ge=1, le=10)
    podman_bind_retry_delay_seconds: float = Field(default=2.0, ge=0)
    omero_inplace_dir: Path = Path("/OMERO/OMERO_inplace")
    processed_folder_name: str = ".processed"
    preprocessing_timeout: PositiveFloat = 3600.0
    preprocessing_parallel: int = Field(default=1, ge=1, le=64)
    allowed_containers: list[str] | None = None

    # --- notifications of outcomes --------------------------------------------------------
    notify_webhook_url: str | None = None
    notify_webhook_secret: SecretStr | None = None
    notify_email_host: str | None = None
    notify_email_port: int = Field(default=587, ge=1, le=65535)
    notify_email_starttls: bool = True
    notify_email_sender: str | None = None
    notify_email_user: str | None = None
    notify_email_password: SecretStr | None = None
    # first wait before a failed delivery is tried again; it doubles up to the maximum
    notify_retry_backoff: PositiveFloat = 5.0
    notify_retry_backoff_max: PositiveFloat = 600.0
    # a channel still failing this long after the outcome is given up (logged, counted)
    notify_give_up_after: PositiveFloat = 3 * 24 * 3600.0
    # one claim of one channel of one outcome; an attempt is cut off at half of it, so another
    # replica takes the delivery over only from a replica that stopped
    notify_delivery_lease: float = Field(default=120.0, ge=2.0)
    notify_webhook_timeout: PositiveFloat = 10.0
    notify_email_timeout: PositiveFloat = 30.0
    # plain http:// to a host that is not this machine sends the body and any Basic-auth
    # credentials in clear: refused unless this is set
    notify_webhook_allow_http: bool = False

    # --- operations -----------------------------------------------------------------------
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    @field_validator("ingest_tracking_db")
    @classmethod
    def _normalise_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return normalise_db_url(value)

    @field_validator("notify_channel")
    @classmethod
    def _channel_is_identifier(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", value):
            raise ValueError("must be a lower-case SQL identifier (letters, digits, underscore)")
        return value

    @field_validator("notify_webhook_url", "notify_email_host", "notify_email_sender")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("notify_webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("notify_webhook_secret")
    @classmethod
    def _standard_webhooks_secrets(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        webhook_keys(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _webhook_over_https(self) -> Settings:
        url = self.notify_webhook_url
        if url is None or self.notify_webhook_allow_http:
            return self
        parts = urlsplit(url)
        if parts.scheme != "https" and not _loopback(parts.hostname or ""):
            raise ValueError(
                "notify_webhook_url must be https:// (http:// only to this machine, or with"
                " notify_webhook_allow_http)"
            )
        return self

    @model_validator(mode="after")
    def _email_has_a_sender(self) -> Settings:
        if self.notify_email_host is not None and self.notify_email_sender is None:
            raise ValueError("notify_email_sender must be set when notify_email_host is")
        return self

    @model_validator(mode="after")
    def _offline_jars_are_never_fetched(self) -> Settings:
        if self.omero_jars_offline and self.fetch_jars:
            raise ValueError("fetch_jars downloads OMERO.java: unset it with omero_jars_offline")
        return self

    @field_validator("processed_folder_name")
    @classmethod
    def _plain_folder_name(cls, value: str) -> str:
        if not value or "/" in value or value in {".", ".."}:
            raise ValueError("must be a single folder name")
        return value

    @field_validator("omero_simulator_fail_pattern")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value

    @field_validator("import_roots")
    @classmethod
    def _absolute_roots(cls, value: list[Path] | None) -> list[Path] | None:
        # Relative roots are taken from the working directory once, at load time, so that a
        # later chdir can never widen what orders may reach.
        if value is None:
            return None
        return [Path(os.path.abspath(root.expanduser())) for root in value]

    # --- derived values -------------------------------------------------------------------
    @property
    def effective_import_roots(self) -> list[Path]:
        return list(self.import_roots) if self.import_roots is not None else [self.base_dir]

    @property
    def simulator_dir(self) -> Path:
        if self.omero_simulator_dir is not None:
            return self.omero_simulator_dir
        return self.embedded_db_dir.parent / "omero-simulator"

    @property
    def uses_embedded_db(self) -> bool:
        return self.ingest_tracking_db is None

    def masked_db_url(self) -> str:
        if self.ingest_tracking_db is None:
            return f"embedded PostgreSQL in {self.embedded_db_dir}"
        return mask_db_url(self.ingest_tracking_db)

    def skip_flags(self) -> list[str]:
        if self.skip_all:
            return ["all"]
        names = ("checksum", "minmax", "thumbnails", "upgrade")
        return [name for name in names if getattr(self, f"skip_{name}")]


FIELD_NAMES: frozenset[str] = frozenset(Settings.model_fields)


class LoadedSettings(BaseModel):
    """Settings plus what loading them noticed (deprecations), to be logged once at startup."""

    settings: Settings
    source: Path | None
    notices: list[str]


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(FIELD_NAMES), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _parse_env_value(key: str, raw: str) -> Any:
    """Environment values are strings; structured keys also take JSON or comma lists."""
    annotation = str(Settings.model_fields[key].annotation)
    structured = "list" in annotation or "dict" in annotation
    if not structured:
        return raw
    text = raw.strip()
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{key}: not valid JSON ({exc.msg})") from exc
    if "dict" in annotation:
        raise SettingsError(f"{key}: expected a JSON object")
    return [item.strip() for item in text.split(",") if item.strip()]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SettingsError(f"config file {path}: not valid YAML ({exc})") from exc
    except OSError as exc:
        raise SettingsError(f"config file {path}: cannot be read ({exc.strerror})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: expected a mapping of settings at the top level")
    return data


def resolve_config_path(explicit: Path | None, environ: dict[str, str]) -> Path | None:
    if explicit is not None:
        if not explicit.is_file():
            raise SettingsError(f"config file {explicit} does not exist")
        return explicit
    from_env = environ.get(CONFIG_ENV)
    if from_env:
        path = Path(from_env)
        if not path.is_file():
            raise SettingsError(f"{CONFIG_ENV}={from_env}: file does not exist")
        return path
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_settings(
    config: Path | None = None, environ: dict[str, str] | None = None
) -> LoadedSettings:
    """Build the settings, or raise SettingsError naming the first bad key."""
    env = dict(os.environ if environ is None else environ)
    path = resolve_config_path(config, env)
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    notices: list[str] = []

    if path is not None:
        for raw_key, value in _read_yaml(path).items():
            key = str(raw_key)
            if key in LEGACY_KEYS or key.startswith(LEGACY_KEY_PREFIXES):
                notices.append(f"setting '{key}' in {path} is no longer used and is ignored")
                continue
            if key not in FIELD_NAMES:
                raise SettingsError(f"unknown setting '{key}' in {path}{_suggest(key)}")
            values[key] = value
            origin[key] = f"'{key}' in {path}"

    for env_name, why in IGNORED_ENV.items():
        if env_name in env:
            notices.append(f"environment variable {env_name} is ignored: {why}")
    # Compose writes ${VAR} as an empty string when .env lacks it: empty means "not set".
    for env_name, key in LEGACY_ENV.items():
        if env.get(env_name, "").strip():
            values[key] = _parse_env_value(key, env[env_name])
            origin[key] = env_name
    for env_name, raw in env.items():
        if not env_name.startswith(ENV_PREFIX) or env_name in NOT_SETTINGS_ENV:
            continue
        key = env_name[len(ENV_PREFIX) :].lower()
        if key not in FIELD_NAMES:
            raise SettingsError(f"unknown environment variable {env_name}{_suggest(key)}")
        if raw.strip():
            values[key] = _parse_env_value(key, raw)
            origin[key] = env_name

    try:
        settings = Settings(**values)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, origin)) from None
    return LoadedSettings(settings=settings, source=path, notices=notices)


def _describe(exc: ValidationError, origin: dict[str, str]) -> str:
    """One line for the first error, never echoing the offending value (it may be a secret)."""
    error = exc.errors(include_input=False)[0]
    loc = [str(part) for part in error["loc"]]
    key = loc[0] if loc else "settings"
    where = origin.get(key, f"'{key}'")
    detail = error["msg"].removeprefix("Value error, ")
    suffix = f" (at {'.'.join(loc[1:])})" if len(loc) > 1 else ""
    return f"invalid setting {where}: {detail}{suffix}"
