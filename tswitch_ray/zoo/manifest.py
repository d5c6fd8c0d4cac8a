"""The zoo manifest (``zoo.yaml``): schema, parsing and URI resolution.

```yaml
name: my-zoo
base: base.safetensors            # or a sharded HF folder, or a .pt state dict
tasks:
  - {name: cars, uri: cars.safetensors}
  - {name: dtd,  uri: s3://zoo/dtd.safetensors}
include: ["*"]                    # optional tensor-name globs (fnmatch)
exclude: []
task_specific: ["classifier.*"]   # optional: stored per task, never switched nor merged
```

Key layouts: a task (or, with ``base_prefix`` / ``base_rename``, the base) whose
tensor names differ from the zoo's takes ``prefix: "bert."`` (a prefix its
names carry) and/or ``rename: {"model.visual.": "visual."}``
(:class:`tswitch_ray.zoo.keymap.KeyRules`); a task without rules whose names
are the base's with one prefix added or removed is mapped automatically.

Relative URIs resolve from the folder holding the YAML file (also when the
YAML itself lives on s3:// or memory://); absolute paths and URLs are kept.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tswitch_ray.errors import ZooError
from tswitch_ray.io.fs import access_checked, open_fs, resolve_against_file
from tswitch_ray.zoo.keymap import KeyRules

# Task names become file names (DIR/<task>.safetensors) and SQL values, so keep
# them to a safe, portable alphabet.
_TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"


class TaskEntry(BaseModel):
    """One fine-tuned checkpoint of the zoo."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_TASK_NAME, max_length=128)
    uri: str = Field(min_length=1)
    # Key layout of this checkpoint (tswitch_ray.zoo.keymap.KeyRules); none given: detected.
    prefix: str = ""
    rename: dict[str, str] = Field(default_factory=dict)

    def key_rules(self) -> KeyRules | None:
        """The rules as written, or None (detect them) when the entry gives none."""
        return KeyRules(prefix=self.prefix, rename=self.rename) if (self.prefix or self.rename) else None


class ZooManifest(BaseModel):
    """Validated contents of a ``zoo.yaml`` (URIs as written, not yet resolved)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    base: str = Field(min_length=1)
    tasks: list[TaskEntry] = Field(min_length=1)
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    # Tensors each task keeps as its own (heads): stored per task, never switched nor merged.
    task_specific: list[str] = Field(default_factory=list)
    base_prefix: str = ""
    base_rename: dict[str, str] = Field(default_factory=dict)

    def base_key_rules(self) -> KeyRules:
        return KeyRules(prefix=self.base_prefix, rename=self.base_rename)

    @field_validator("include")
    @classmethod
    def _include_not_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("include must list at least one glob (the default is [\"*\"])")
        return v

    @model_validator(mode="after")
    def _unique_task_names(self) -> ZooManifest:
        seen: set[str] = set()
        dups = [t.name for t in self.tasks if t.name in seen or seen.add(t.name)]
        if dups:
            raise ValueError(f"duplicate task names: {sorted(set(dups))}")
        return self


def resolve_uri(manifest_uri: str, uri: str) -> str:
    """``uri`` as written in the manifest at ``manifest_uri``, made absolute.

    URLs (``scheme://...``) and absolute local paths are kept; relative paths
    are joined to the manifest's folder, keeping the manifest's scheme (see
    :func:`tswitch_ray.io.fs.resolve_against_file`).
    """
    return resolve_against_file(manifest_uri, uri)


def _format_validation_error(uri: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ())) or "(top level)"
        if e.get("type") == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif e.get("type") == "missing":
            parts.append(f"missing required key '{loc}'")
        else:
            msg = e.get("msg", "").removeprefix("Value error, ")
            parts.append(f"'{loc}': {msg}")
    return (
        f"zoo manifest {uri} is invalid: " + "; ".join(parts) + ". Expected keys: name, base, "
        "tasks (a non-empty list of {name, uri, optional prefix/rename} with unique names), optional "
        "include/exclude/task_specific glob lists and base_prefix/base_rename."
    )


def parse_manifest(text: str, uri: str = "<string>") -> ZooManifest:
    """Parse and validate manifest YAML text; ``uri`` is only used in errors."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ZooError(f"zoo manifest {uri} is not valid YAML{where}: {problem}.") from None
    if not isinstance(data, dict):
        raise ZooError(
            f"zoo manifest {uri} must be a YAML mapping with keys name, base, tasks; "
            f"got {type(data).__name__}."
        )
    try:
        return ZooManifest.model_validate(data)
    except ValidationError as e:
        raise ZooError(_format_validation_error(uri, e)) from None


def read_manifest(manifest_uri: str, storage_options: dict[str, Any] | None = None) -> ZooManifest:
    """Read and validate the YAML at ``manifest_uri`` (any fsspec URL)."""
    fs, path = open_fs(manifest_uri, storage_options)
    try:
        with access_checked("zoo manifest", manifest_uri):
            raw = fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError):
        raise ZooError(f"zoo manifest {manifest_uri} does not exist (or is not a file).") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ZooError(f"zoo manifest {manifest_uri} is not UTF-8 text.") from None
    return parse_manifest(text, manifest_uri)
