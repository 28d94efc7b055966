"""Urza settings: the URLs, token and service limits that come from the environment, in one object.

:class:`UrzaEnvironment` reads the variables (pydantic-settings); :class:`UrzaSettings` is the
validated object the library, the service and the CLI take (``UrzaSettings.from_env()``, or built
directly, which reads no environment).

==================================  ===============================================================
``ESPER_URZA_URL``                   the shared service, ``http(s)://host:port`` (clients use it)
``ESPER_URZA_METADATA_URL``          ``sqlite:///path`` or ``postgresql://user@host:port/db``
``ESPER_URZA_BLOB_URL``              ``file:///path`` or ``s3://bucket/prefix?endpoint_url=…``
``ESPER_URZA_TOKEN``                 the service's bearer token (service and clients)
``ESPER_URZA_RUN_DIR``               folder of the embedded defaults (``runs/urza``)
``ESPER_URZA_MAX_ARTIFACT_BYTES``    service: largest kernel upload (512 MiB)
``ESPER_URZA_MAX_CONCURRENT_UPLOADS``  service: uploads in progress at once (8)
``ESPER_URZA_MAX_REQUEST_BYTES``     service: largest JSON request body (1 MiB)
``ESPER_URZA_MAX_KERNEL_PARAMETERS`` service: largest kernel a compile job may ask for (unlimited)
==================================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from esper.contracts.bounds import MAX_ARTIFACT_BYTES, MAX_PARAMETERS
from esper.errors import ConfigurationError
from esper.urza.api_models import TOKEN_ENV

DEFAULT_RUN_DIR = Path("runs/urza")
"""Where the embedded library keeps ``urza.sqlite3`` and ``blobs/`` unless told otherwise."""

DEFAULT_MAX_ARTIFACT_BYTES = 512 * 1024 * 1024
"""Largest kernel upload the service accepts by default."""


class ServiceLimits(BaseModel):
    """What one Urza service accepts: sizes of uploads and requests, and of the kernels it queues.

    Attributes:
        max_artifact_bytes: uploads larger than this are refused (413), and so are compile jobs
            whose kernel's tensors alone would be larger.
        max_concurrent_uploads: uploads in progress at once; one more is answered 503 (retry).
            Bounds the temporary disk the service uses to ``max_concurrent_uploads *
            max_artifact_bytes``.
        max_request_bytes: largest JSON request body (blueprints, job requests, searches).
        max_kernel_parameters: compile jobs and uploads of kernels with more parameters are
            refused; ``None``: only ``max_artifact_bytes`` bounds them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_artifact_bytes: int = Field(default=DEFAULT_MAX_ARTIFACT_BYTES, gt=0, le=MAX_ARTIFACT_BYTES)
    max_concurrent_uploads: int = Field(default=8, gt=0, le=10_000)
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_kernel_parameters: int | None = Field(default=None, gt=0, le=MAX_PARAMETERS)

    def updated(self, **changes: int | None) -> ServiceLimits:
        """These limits with ``changes`` applied (``None`` values ignored), validated.

        Raises:
            ConfigurationError: a value is out of its range (the message names the option).
        """
        given = {field: value for field, value in changes.items() if value is not None}
        try:
            return ServiceLimits.model_validate(self.model_dump() | given)
        except ValidationError as error:
            problems = "; ".join(
                f"--{str(err['loc'][-1]).replace('_', '-')}: {err['msg']}"
                for err in error.errors(include_url=False)
            )
            raise ConfigurationError(f"invalid Urza service limits: {problems}") from None


class UrzaEnvironment(BaseSettings):
    """The ``ESPER_URZA_*`` variables as given (read by pydantic-settings; an empty one is unset).

    The values stay text here: :meth:`UrzaSettings.from_env` validates them, so a bad value is
    reported under its variable's name. Reading them needs no server and imports no backend.
    """

    model_config = SettingsConfigDict(env_ignore_empty=True, extra="ignore", frozen=True)

    url: str | None = Field(default=None, validation_alias="ESPER_URZA_URL")
    metadata_url: str | None = Field(default=None, validation_alias="ESPER_URZA_METADATA_URL")
    blob_url: str | None = Field(default=None, validation_alias="ESPER_URZA_BLOB_URL")
    token: SecretStr | None = Field(default=None, validation_alias=TOKEN_ENV)
    run_dir: str | None = Field(default=None, validation_alias="ESPER_URZA_RUN_DIR")
    max_artifact_bytes: str | None = Field(
        default=None, validation_alias="ESPER_URZA_MAX_ARTIFACT_BYTES"
    )
    max_concurrent_uploads: str | None = Field(
        default=None, validation_alias="ESPER_URZA_MAX_CONCURRENT_UPLOADS"
    )
    max_request_bytes: str | None = Field(
        default=None, validation_alias="ESPER_URZA_MAX_REQUEST_BYTES"
    )
    max_kernel_parameters: str | None = Field(
        default=None, validation_alias="ESPER_URZA_MAX_KERNEL_PARAMETERS"
    )

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> UrzaEnvironment:
        """The variables of ``environ``, or of the process environment when ``None``."""
        if environ is None:
            return cls()
        given = {name: value for name, value in environ.items() if value}
        return _GivenVariables.model_validate(given)

    def variable(self, field: str) -> str:
        """The environment variable of ``field`` (``max_artifact_bytes`` ->
        ``ESPER_URZA_MAX_ARTIFACT_BYTES``)."""
        alias = type(self).model_fields[field].validation_alias
        return str(alias) if alias is not None else field


class _GivenVariables(UrzaEnvironment):
    """The variables of a given mapping only (the process environment is not read)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values given to the constructor."""
        return (init_settings,)


class UrzaSettings(BaseModel):
    """Where the library is, how to authenticate to it, and what the service accepts.

    Attributes:
        url: the shared service's URL; when set (and no storage URL is given) clients use it.
        metadata_url: SQL database of the storage-backed library.
        blob_url: blob store of the storage-backed library.
        token: bearer token of the service (hidden in ``repr``).
        run_dir: folder of the embedded defaults (``<run_dir>/urza.sqlite3``, ``<run_dir>/blobs``).
        limits: the service's limits.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str | None = None
    metadata_url: str | None = None
    blob_url: str | None = None
    token: SecretStr | None = None
    run_dir: Path = DEFAULT_RUN_DIR
    limits: ServiceLimits = ServiceLimits()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> UrzaSettings:
        """Settings from ``ESPER_URZA_*`` variables (``os.environ`` unless given); empty = unset.

        Raises:
            ConfigurationError: a variable's value is invalid (a limit not a number in its
                range); the message names the variable.
        """
        environment = UrzaEnvironment.read(environ)
        values: dict[str, Any] = environment.model_dump(exclude_none=True)
        limits = {name: values.pop(name) for name in ServiceLimits.model_fields if name in values}
        try:
            return cls.model_validate(values | {"limits": limits})
        except ValidationError as error:
            problems = "; ".join(
                f"{environment.variable(str(err['loc'][-1]))}: {err['msg']}"
                for err in error.errors(include_url=False)
            )
            raise ConfigurationError(
                f"invalid Urza settings in the environment: {problems}"
            ) from None

    def with_options(self, options: Mapping[str, Any]) -> UrzaSettings:
        """These settings with the ``options`` named like their fields (``metadata_url``,
        ``blob_url``, ``run_dir``) or like a limit (``max_artifact_bytes``…) replaced; other names
        and ``None`` values are ignored, e.g. ``settings.with_options(vars(args))``.

        Raises:
            ConfigurationError: a limit out of its range (the message names the option).
        """
        given = {name: value for name, value in options.items() if value is not None}
        limits = {name: given[name] for name in ServiceLimits.model_fields if name in given}
        fields = {"metadata_url", "blob_url", "run_dir"} & set(given)
        update: dict[str, Any] = {name: given[name] for name in fields}
        if "run_dir" in update:
            update["run_dir"] = Path(update["run_dir"])
        return self.model_copy(update=update | {"limits": self.limits.updated(**limits)})
