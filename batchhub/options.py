"""The one way in: options (CLI flags or `run()` keywords) -> a JobSpec, and an engine -> a job.

`batchhub run`, `batchhub estimate`, `batchhub.run()`/`arun()` and `run_job()` all build
their JobSpec with `build_spec` and their job with `Engine.make_job`, so the same settings
give the same job and the same requests whichever way they came in.

Semantics, decided once:

- an option that is None was not given; every other one wins over the spec file;
- `params` merge key by key over the spec's `[params]` (a given key wins), every other
  setting replaces the spec's value; a prompt source (template, prompt_column,
  messages_column) given replaces the spec's, whichever kind it was;
- `mock=True` sends to the simulator (`base_url = "mock://"`); a dict is a `[mock]` table;
- `prices` given as a path is a prices file (`prices_file`); a dict is a `[prices]` table;
- a missing input file is an `InputError` (exit 2).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchhub.errors import InputError, UsageError
from batchhub.objstore import input_location, is_url
from batchhub.spec import JobSpec, load_spec

if TYPE_CHECKING:
    from batchhub.ray_engine import RayJob
    from batchhub.runner import Job, PreparedJob

#: options that choose where a job runs: this process, or a Ray cluster
ENGINE_OPTIONS = ("engine", "ray_address", "shard_rows", "max_shards_in_flight")


def build_spec(target: str | os.PathLike[str] | None, options: dict[str, Any], *, origin: str) -> JobSpec:
    """The JobSpec for TARGET (an input file, a TOML spec, or None for a DataFrame) with OPTIONS over it.

    OPTIONS are JobSpec fields (`mock` and `prices` as described in the module docstring);
    `origin` names where they came from in error messages.
    """
    settings = _settings(options)
    api_key = settings.pop("api_key", None)
    given = JobSpec.from_mapping(settings, origin=origin)  # names, tables and ~ in paths checked
    chosen = {name: getattr(given, name) for name in settings}
    if target is None:
        spec = JobSpec()
    elif is_url(target):
        spec = JobSpec(input=input_location(str(target)))  # a URL stays a str (checked when the job opens it)
    else:
        path = Path(target)
        if path.suffix.lower() == ".toml":
            spec = load_spec(path)
        else:
            if not path.exists():
                raise InputError(f"input file not found: {path}")
            spec = JobSpec(input=path)
    if "params" in chosen:
        chosen["params"] = {**spec.params, **chosen["params"]}
    spec = spec.merged(chosen)
    if api_key is not None:
        spec.api_key = api_key
    return spec


def _settings(options: dict[str, Any]) -> dict[str, Any]:
    """The options that were given, as JobSpec fields."""
    settings = {name: value for name, value in options.items() if value is not None}
    mock = settings.get("mock")
    if isinstance(mock, bool):  # the --mock flag; a dict is the [mock] table of a spec
        del settings["mock"]
        if mock:
            settings["base_url"] = "mock://"
    if isinstance(settings.get("prices"), (str, os.PathLike)):  # --prices FILE
        settings["prices_file"] = settings.pop("prices")
    return settings


@dataclass(frozen=True)
class Engine:
    """Where a job runs: `local` (this process) or `ray` (a cluster, one task per shard)."""

    engine: str = "local"
    ray_address: str | None = None
    shard_rows: int | None = None
    max_shards_in_flight: int | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any], *, flags: bool = False) -> Engine:
        """Take the engine options out of OPTIONS and check them; `flags` names them as CLI flags in errors."""
        taken = {name: options.pop(name) for name in ENGINE_OPTIONS if name in options}
        chosen = {name: value for name, value in taken.items() if value is not None}
        engine = chosen.pop("engine", "local")
        if engine not in ("local", "ray"):
            raise UsageError(f"engine must be 'local' or 'ray', not {engine!r}")
        if engine == "local" and chosen:
            if flags:
                names = ", ".join("--" + name.replace("_", "-") for name in sorted(chosen))
                raise UsageError(f"{names} go with --engine ray")
            raise UsageError(f"{', '.join(sorted(chosen))} go with engine='ray'")
        return cls(engine, **chosen)

    def make_job(self, prepared: PreparedJob, progress: bool | None = None, **job_options: Any) -> Job | RayJob:
        """A Job, or a RayJob (the same `run()` and `request_stop()`) for engine 'ray'."""
        if self.engine == "ray":
            from batchhub.ray_engine import RayJob

            if prepared.spec.via == "batch":
                raise UsageError(
                    "--via batch runs in this process (the provider runs the batches); "
                    "--engine ray is for live requests"
                )

            if job_options:  # a session, a clock, rows to run: pieces of the local loop
                raise UsageError(f"{', '.join(sorted(job_options))} apply only to engine 'local'")

            return RayJob(
                prepared,
                address=self.ray_address,
                shard_rows=self.shard_rows,
                max_shards_in_flight=self.max_shards_in_flight,
                progress=progress,
            )
        from batchhub.runner import Job

        return Job(prepared, progress=progress, **job_options)


def job_dir_of(path: Path | str) -> Path:
    """A job is named by its directory, its URL (s3://bucket/jobs/demo) or its spec file (jobs/demo.toml ->
    jobs/demo). A job in a bucket is read from a copy on this machine of what the bucket holds now."""
    from batchhub.objstore import is_url
    from batchhub.remote_job import local_job_dir

    if not is_url(path) and Path(path).suffix.lower() == ".toml":
        spec = load_spec(path)
        url = spec.job_url()
        return local_job_dir(str(url) if url is not None else spec.resolved_job_dir())
    return local_job_dir(path)


def recorded_spec(job_dir: Path) -> JobSpec:
    """The spec a job directory's job.json recorded (never a key: that comes from the environment or a flag)."""
    from batchhub.manifest import Manifest

    manifest = Manifest.load(Path(job_dir) / "job.json")
    known = {f.name for f in dataclasses.fields(JobSpec)} - {"api_key"}
    settings = {name: value for name, value in manifest.spec.items() if name in known and value is not None}
    spec = JobSpec.from_mapping(settings, origin=f"{job_dir}/job.json")
    spec.job_dir = Path(job_dir)
    return spec
