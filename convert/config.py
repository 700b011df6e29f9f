"""Configuration: frozen pydantic models, loaded from YAML and/or CLI overrides, validated once.

Errors are `ConfigError` with one line per problem naming the dotted key and what is allowed.
`${ENV_VAR}` in string values is interpolated at load time *on the machine that reads it*, except
inside `storage_options`, where references stay as written and are resolved where used (client and
each worker; see convert.secrets) so secrets never travel in a task graph. Manifests get `redacted()`.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field, field_validator, model_validator

from .fetch.policy import DEFAULT_DIRECTIVES, DEFAULT_USER_AGENT
from .redact import is_secret_key, redact_options, redact_url

__all__ = ["Config", "ConfigError", "is_secret_key", "load_config", "parse_override", "validate"]


class ConfigError(ValueError):
    """A user-facing configuration problem; the message says the key and the fix."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Model):
    uri: str = Field(description="folder, glob, URL list (.txt/.csv/.parquet), CIFAR batch file/folder")
    kind: Literal["auto", "folder", "urls", "cifar"] = "auto"
    storage_options: dict[str, Any] = Field(default_factory=dict)
    labels: Literal["auto", "folder", "none"] = "auto"  # ImageFolder labels from class sub-folders
    # Absolute directories a local URL list may name paths under, besides the list's own directory.
    allowed_roots: tuple[str, ...] = ()
    # Image-text lists: the caption column ("auto": the first of caption, text, TEXT, txt present;
    # "none": no caption), other list columns kept beside each image (names, or "*" for all), the
    # cap on a text value (longer is truncated and counted), and a column of expected digests of
    # the image bytes (sha256 or md5 hex; a mismatch is status hash_mismatch).
    caption_column: str = "auto"
    columns: tuple[str, ...] | Literal["*"] = ()
    max_text_bytes: int = Field(65536, gt=0)
    hash_column: str | None = None

    @field_validator("columns", mode="before")
    @classmethod
    def _columns(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().startswith("["):  # "[a, b]" as a Python override
            v = yaml.safe_load(v)
        if isinstance(v, str) and v != "*":  # "a,b" or one name
            return tuple(c.strip() for c in v.split(",") if c.strip())
        return v


class OutputConfig(_Model):
    """The dataset root, its format and the format's own section (`output.hdf5.compression: gzip`).

    Format names and option sections come from the format registry (convert.formats.base). The
    wave-1 keys `output.compression` / `output.compression_level` still work: they are HDF5's,
    moved into `output.hdf5`. `compression`/`compression_level` stay in the dumped config (the
    fingerprint and manifests of wave 1 read them there), computed from the format's section.
    """

    uri: str
    format: str = "hdf5"
    storage_options: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-format sections, by format name
    force_unlock: bool = False  # take over a stale lease of another run (convert.lease)
    lease_ttl: float = Field(60.0, ge=1.0)  # seconds without a heartbeat before a lease is stale
    verify_resume: bool = False  # resume re-hashes every committed shard instead of the identity check

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: Any) -> Any:
        """`output.<format>: {...}` and the wave-1 HDF5 keys -> `options[<format>]`."""
        from .formats.base import FORMATS

        if not isinstance(data, dict):
            return data
        data = dict(data)
        given = data.pop("options", None) or {}
        if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
            raise ValueError(
                "output.options maps a format name to its section, e.g. {hdf5: {compression: gzip}}; "
                "or set output.<format>.<key>"
            )
        options = {k: dict(v) for k, v in given.items()}
        for name in FORMATS:
            if isinstance(data.get(name), dict):
                options[name] = {**options.get(name, {}), **data.pop(name)}
        for legacy in ("compression", "compression_level"):  # wave 1: HDF5's, at the top level
            if legacy in data:
                options.setdefault("hdf5", {}).setdefault(legacy, data.pop(legacy))
        fmt = data.get("format", "hdf5")
        if isinstance(fmt, str) and fmt in FORMATS:
            options.setdefault(fmt, {})  # the output's own section is always there, defaults filled
        data["options"] = options
        return data

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        from .formats.base import FORMATS

        if v not in FORMATS:
            raise ValueError(f"unknown format {v!r}; expected one of {sorted(FORMATS)}")
        return v

    @field_validator("options")
    @classmethod
    def _format_options(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from .formats.base import FORMATS

        unknown = sorted(set(v) - set(FORMATS))
        if unknown:
            raise ValueError(f"no format named {unknown[0]!r}; format sections: {sorted(FORMATS)}")
        return {name: FORMATS[name].validate_options(section) for name, section in v.items()}

    def format_options(self) -> dict[str, Any]:
        """This output's format section, validated, defaults filled."""
        from .formats.base import get_format

        return self.options.get(self.format) or get_format(self.format).validate_options({})

    @computed_field  # type: ignore[prop-decorator]
    @property
    def compression(self) -> str:
        return str(self.format_options()["compression"])

    @computed_field  # type: ignore[prop-decorator]
    @property
    def compression_level(self) -> int:
        return int(self.format_options()["compression_level"])


class ImageConfig(_Model):
    size: tuple[int, int] | None = (64, 64)  # (H, W); None keeps the source size
    # keep_ratio: shorter side -> size, keep_ratio_largest: longer side -> size (aspect kept, no crop;
    # variable shapes); both take one length (image.size: 256). See convert/geometry.py.
    resize: Literal["center_crop", "pad", "stretch", "keep_ratio", "keep_ratio_largest", "none"] = "center_crop"
    upscale: bool = True  # false: never enlarge (images smaller than the target keep their size)
    mode: Literal["RGB", "L"] = "RGB"
    pad_color: tuple[int, int, int] = (0, 0, 0)
    encode: Literal["raw", "original", "jpeg", "png", "webp"] = "raw"
    quality: int = Field(90, ge=1, le=100)
    draft: bool = True  # JPEG DCT-domain downscale while decoding
    # JPEG decoder when draft is on: "auto" = simplejpeg if installed (the fast-jpeg extra), else
    # Pillow; "simplejpeg" insists on it; "pillow" always uses Pillow. Other formats always use Pillow.
    decoder: Literal["auto", "simplejpeg", "pillow"] = "auto"
    max_pixels: int = Field(89_478_485, gt=0)  # Pillow's default bomb threshold
    # Filters, decided from the header before decoding; a refused image is status `filtered`.
    min_size: int = Field(0, ge=0)  # shorter side below this (px) is refused
    max_aspect_ratio: float | None = Field(None, ge=1)  # max(w, h) / min(w, h) above this is refused
    max_area: int | None = Field(None, gt=0)  # w * h above this is refused

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return (v, v)
        if isinstance(v, (list, tuple)) and len(v) == 1:
            return (v[0], v[0])
        return v

    @field_validator("size")
    @classmethod
    def _positive(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and min(v) <= 0:
            raise ValueError("size must be positive: N or [H, W]")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ImageConfig":
        if self.resize != "none" and self.size is None:
            raise ValueError(f"resize={self.resize!r} needs image.size (e.g. 64 or [64, 48])")
        keep_ratio = self.resize in ("keep_ratio", "keep_ratio_largest")
        if keep_ratio and self.size is not None and self.size[0] != self.size[1]:
            side = "shorter" if self.resize == "keep_ratio" else "longer"
            fix = f"image.size: {self.size[0]}, not {list(self.size)}"
            raise ValueError(f"resize={self.resize!r} takes one length, the {side} side's ({fix})")
        if self.decoder == "simplejpeg" and importlib.util.find_spec("simplejpeg") is None:
            raise ValueError("decoder='simplejpeg' needs simplejpeg: pip install 'convert[fast-jpeg]' (or use 'auto')")
        return self


class ShardConfig(_Model):
    size: int = Field(1000, gt=0, description="items per shard")


class FetchConfig(_Model):
    threads: int = Field(16, gt=0, le=512)
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(3, ge=0)
    backoff: float = Field(0.2, ge=0)
    max_bytes: int = Field(50 * 2**20, gt=0)
    prefetch_bytes: int = Field(256 * 2**20, gt=0)
    allowed_schemes: tuple[str, ...] = ("file", "http", "https", "s3", "gs", "gcs", "az", "abfs", "memory")
    item_timeout: float = Field(60.0, gt=0)  # total seconds per item: connect + all reads + retries
    # HTTP(S) to loopback/private/link-local/multicast/reserved addresses (checked on the resolved IP
    # of every connection, redirects included) is refused unless this is true (config or --set only:
    # no environment variable turns the guard off)
    allow_private_networks: bool = False
    allowed_networks: tuple[str, ...] = ()  # CIDRs allowed even so, e.g. ["10.1.2.0/24"] for a mirror
    # HTTP(S) client: "curl" = libcurl multi via pycurl (the `fast-http` extra; ~1/5 of the CPU per
    # GET), "urllib3" = the pure-Python pool, "auto" = curl when pycurl is installed.
    backend: Literal["auto", "curl", "urllib3"] = "auto"
    # digest of each item's source bytes, stored as a column named after the algorithm and in the ledger
    compute_hash: Literal["sha256", "md5", "none"] = "sha256"
    # crawl etiquette (fetch/robots.py): the User-Agent both HTTP backends send, the bot name appended to
    # it (and matched in X-Robots-Tag / robots.txt; default: the User-Agent's product token, "convert"),
    # the X-Robots-Tag directives that opt an item out, and whether robots.txt is fetched and obeyed
    user_agent: str = DEFAULT_USER_AGENT
    user_agent_token: str | None = None
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DIRECTIVES
    robots_txt: Literal["ignore", "respect"] = "ignore"

    @field_validator("user_agent")
    @classmethod
    def _header_safe(cls, v: str) -> str:
        if not v.strip() or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in v):
            raise ValueError("must be non-empty printable text on one line (it is sent as the User-Agent header)")
        return v.strip()

    @field_validator("user_agent_token")
    @classmethod
    def _product_token(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_-]+", v):
            raise ValueError(f"{v!r} is not a product token: letters, '_' and '-' only (RFC 9309), e.g. mybot")
        return v or None

    @field_validator("disallowed_header_directives")
    @classmethod
    def _directives(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for d in v:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", d):
                raise ValueError(f"{d!r} is not an X-Robots-Tag directive; use names like noai or noindex")
        return tuple(d.lower() for d in v)

    @field_validator("backend")
    @classmethod
    def _backend_installed(cls, v: str) -> str:
        if v == "curl" and importlib.util.find_spec("pycurl") is None:
            raise ValueError("backend='curl' needs pycurl: pip install 'convert[fast-http]' (or use 'auto')")
        return v

    @field_validator("allowed_networks")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not a network; use CIDR notation like 10.1.2.0/24") from None
        return v


class ClusterConfig(_Model):
    # auto: threads in this process for a small plan, a LocalCluster beyond (executor/auto.py says the rule);
    # local: always a LocalCluster; threads: always in process; slurm/pbs: batch jobs (dask-jobqueue)
    kind: Literal["auto", "local", "slurm", "pbs", "threads"] = "auto"
    workers: int | None = Field(None, gt=0)  # LocalCluster processes; None = sized to this machine
    threads_per_worker: int = Field(1, gt=0)
    memory_limit: str = "auto"
    scheduler: str | None = None  # tcp://host:8786 of a running scheduler
    scheduler_file: str | None = None
    task_retries: int = Field(2, ge=0)
    shared_filesystem: bool = False  # local paths are visible to every worker (NFS/Lustre/...)
    dashboard: bool = True
    # batch-system settings (dask-jobqueue); unset values fall back to dask's jobqueue.yaml
    jobs: int = Field(1, gt=0)
    cores: int | None = None
    memory: str | None = None
    walltime: str | None = None
    queue: str | None = None
    account: str | None = None
    job_extra: tuple[str, ...] = ()


class RunConfig(_Model):
    fail_on_item_errors: bool = False
    overwrite: bool = False  # False: resume; True: discard existing shards first
    # rebuild committed shards whose ledgers hold these statuses (http_error: only 429/5xx)
    retry_failed: tuple[str, ...] = ()
    append: bool = False  # convert only what the source gained into new shards (convert.append)
    rebuild_changed: bool = False  # with append: retire the shards of a changed part and convert it again


class Config(_Model):
    source: SourceConfig
    output: OutputConfig
    image: ImageConfig = ImageConfig()
    shard: ShardConfig = ShardConfig()
    fetch: FetchConfig = Field(default_factory=FetchConfig)  # per load: its defaults may read the environment
    cluster: ClusterConfig = ClusterConfig()
    run: RunConfig = RunConfig()

    def with_absolute_paths(self) -> "Config":
        """Local source/output paths made absolute on the client, so workers with another cwd agree."""
        updates = {}
        for section in ("source", "output"):
            part = getattr(self, section)
            if "://" not in part.uri and not os.path.isabs(part.uri):
                updates[section] = part.model_copy(update={"uri": os.path.abspath(part.uri)})
        return self.model_copy(update=updates)

    def redacted(self) -> dict[str, Any]:
        """The config as plain data with storage_options secrets removed (for manifests/logs)."""
        data = self.model_dump(mode="json")
        for section in ("source", "output"):
            data[section]["storage_options"] = redact_options(data[section]["storage_options"])
            data[section]["uri"] = redact_url(data[section]["uri"])
        return data


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _require_env(name: str, where: str) -> str:
    if name not in os.environ:
        raise ConfigError(f"{where}: environment variable ${{{name}}} is not set; export it or edit the config")
    return os.environ[name]


def _interpolate(value: Any, where: str = "") -> Any:
    """Replace ${VAR} in strings with the environment value; missing vars are a ConfigError."""
    if isinstance(value, dict):
        return {
            k: (_check_references if k == "storage_options" else _interpolate)(v, f"{where}.{k}" if where else str(k))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, where) for v in value]
    if isinstance(value, str):
        return _ENV.sub(lambda m: _require_env(m.group(1), where), value)
    return value


def _check_references(value: Any, where: str) -> Any:
    """storage_options keep their ${VAR} references (resolved where used, see convert.secrets);
    a variable missing on this machine is still reported at load time."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_references(v, f"{where}.{k}")
    elif isinstance(value, list):
        for v in value:
            _check_references(v, where)
    elif isinstance(value, str):
        for name in _ENV.findall(value):
            _require_env(name, where)
    return value


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set data['a']['b'] = value for 'a.b' (creating sections as needed)."""
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'image.size=[64, 48]' -> ('image.size', [64, 48]); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. --set image.quality=85")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load YAML (optional), apply dotted overrides, interpolate ${ENV}, validate once."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"{path}: not valid YAML ({exc.__class__.__name__}: {str(exc).splitlines()[0]})"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (source:, output:, ...)")
        data = loaded or {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return validate(_interpolate(data))


def validate(data: dict[str, Any]) -> Config:
    """Validate plain data into a Config; pydantic errors become one line per key."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(e) for e in exc.errors())) from None


def _describe(err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "config"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = err["loc"][:-1]
        model: Any = Config
        for p in parent:
            model = model.model_fields[p].annotation
        allowed = ", ".join(model.model_fields)
        return f"unknown key {loc!r}; allowed keys here: {allowed}"
    if kind == "missing":
        return f"{loc}: required (e.g. --{loc.split('.')[0]} PATH or '{loc}: ...' in the YAML)"
    if kind == "literal_error":
        return f"{loc}: {err['input']!r} is not allowed; expected {err['ctx']['expected']}"
    given = "***" if "storage_options" in loc else redact_options(err.get("input"))  # never echo a secret
    return f"{loc}: {err['msg']} (got {given!r})"
