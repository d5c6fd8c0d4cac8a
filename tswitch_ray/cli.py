"""`tswitch`: one verb per job. Presentation only; the work lives in the library."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tswitch_ray.errors import ConfigError
from tswitch_ray.library_logs import quiet_library_logs
from tswitch_ray.options import RunOptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="Binary task switches (T-Switch, Auto-Switch) and model-merging evaluation for model zoos, on Ray.",
)
zoo_app = typer.Typer(no_args_is_help=True, help="Make, convert and inspect zoos.")
registry_app = typer.Typer(no_args_is_help=True, help="Query the artifact registry with SQL.")
app.add_typer(zoo_app, name="zoo")
app.add_typer(registry_app, name="registry")

console = Console(stderr=True)
out = Console()


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors into one paragraph on stderr and exit code 2 (no traceback).

    User errors are ``TSwitchError``s, also when raised inside a Ray task (which wraps them), and the storage
    faults that io/faults.py recognises (a full disk, an unreachable endpoint) wherever they escaped from.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tswitch_ray.io.faults import user_error_of

        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:
            msgs = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
            console.print(f"[bold red]error:[/] invalid options: {escape(msgs)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted:[/] nothing was committed; run the same command again to resume "
                          "(finished shards are reused).")
            raise typer.Exit(130) from None
        except Exception as raised:  # noqa: BLE001 - user_error_of keeps bugs (None) with their traceback
            exc = user_error_of(raised)
            if exc is None:
                raise
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _storage_options(pairs: list[str] | None, endpoint: str | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--storage-option expects KEY=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    if endpoint:
        opts.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
    return opts


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


# --- run options: one option group for every verb that runs a job ------------------------------------------

RUN_PANEL = "Run options"

# Every default is "not given" (None, False): a flag that is left out sets nothing, so the defaults of
# RunOptions (or an eval config's own `run:`) apply.
_EXECUTION_FLAGS: dict[str, tuple[Any, Any]] = {
    "executor": (Optional[str], typer.Option(
        None, "--executor", rich_help_panel=RUN_PANEL,
        help="'ray' (a local Ray, or the cluster at --ray-address), 'local' (one process, no Ray) or 'auto' "
             "(build and merge's default: in-process below 256 MB read, else Ray; a running Ray is always used).")),
    "ray_address": (Optional[str], typer.Option(
        None, "--ray-address", envvar="RAY_ADDRESS", rich_help_panel=RUN_PANEL,
        help="Attach to an existing Ray cluster (`ray start --head`), e.g. 127.0.0.1:6379 or 'auto'.")),
    "workers": (Optional[int], typer.Option(
        None, "--workers", rich_help_panel=RUN_PANEL,
        help="CPUs of the local Ray started when no --ray-address is given (default: all).")),
    "num_gpus": (Optional[float], typer.Option(
        None, "--num-gpus", rich_help_panel=RUN_PANEL,
        help="GPUs per task (fractions allowed; default 0); tasks compute on CUDA when > 0.")),
    "quiet": (bool, typer.Option(False, "--quiet", "-q", rich_help_panel=RUN_PANEL, help="No progress bar.")),
    "verbose": (bool, typer.Option(False, "--verbose", rich_help_panel=RUN_PANEL,
                                   help="Also show Ray's and MLflow's own log lines (start-up notices, INFO).")),
}
_STORAGE_FLAGS: dict[str, tuple[Any, Any]] = {
    "storage_option": (Optional[list[str]], typer.Option(
        None, "--storage-option", "-S", rich_help_panel=RUN_PANEL,
        help="fsspec storage option KEY=VALUE (repeatable; VALUE is JSON where it parses), e.g. -S anon=false "
             "or -S key=... -S secret=...; credentials are never written to any output, log or message.")),
    "s3_endpoint": (Optional[str], typer.Option(
        None, "--s3-endpoint", envvar="TSWITCH_S3_ENDPOINT", rich_help_panel=RUN_PANEL,
        help="S3 endpoint URL for s3:// URIs (e.g. a SeaweedFS or MinIO server).")),
}


def run_options(executor: Optional[str] = None, ray_address: Optional[str] = None, workers: Optional[int] = None,
                num_gpus: Optional[float] = None, quiet: bool = False, storage_option: Optional[list[str]] = None,
                s3_endpoint: Optional[str] = None) -> RunOptions:
    """The :class:`RunOptions` of the run-option flags. Only the flags given are set (``run.explicit()``), so an
    eval config's own ``run:`` keeps what no flag overrides."""
    given = {"executor": executor, "ray_address": ray_address, "num_workers": workers, "num_gpus": num_gpus}
    fields: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if quiet:
        fields["show_progress"] = False
    if storage_option or s3_endpoint:
        fields["storage_options"] = _storage_options(storage_option, s3_endpoint)
    return RunOptions(**fields)


def _auto_executor(run: RunOptions) -> RunOptions:
    """``run`` with executor "auto" unless --executor was given (distributed/inprocess.py decides then)."""
    return run if "executor" in run.model_fields_set else run.model_copy(update={"executor": "auto"})


def with_run_options(execution: bool = True, storage: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the run-option flags (shown under "Run options" in its help) and call it with them as
    one ``run: RunOptions``. ``execution``: --executor, --ray-address, --workers, --num-gpus, --quiet, --verbose;
    ``storage``: --storage-option/-S, --s3-endpoint."""
    flags = {**(_EXECUTION_FLAGS if execution else {}), **(_STORAGE_FLAGS if storage else {})}

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for name, p in inspect.signature(fn).parameters.items() if name != "run"]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
                 for name, (annotation, option) in flags.items()]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in flags}
            quiet_library_logs(bool(given.pop("verbose", False)))
            return fn(*args, run=run_options(**given), **kwargs)

        # typer reads the parameters from the signature and their types from the annotations.
        command.__signature__ = inspect.signature(fn).replace(parameters=own + added)  # type: ignore[attr-defined]
        command.__annotations__ = {**{k: v for k, v in fn.__annotations__.items() if k != "run"},
                                   **{name: annotation for name, (annotation, _) in flags.items()}}
        return command

    return decorate


ALPHA_ZERO_WARNING = ("warning: α = 0 is not lossless. It keeps every element of τ, but a switch stores only its sign "
                      "and one knob per tensor: each changed element is rebuilt as θ0 ± knob, not θ0 + τ. For the exact "
                      "fine-tuned weights keep the checkpoint; see docs/MATH.md (T-Switch).")
_DEMO_ZOO = ".tswitch/demo/zoo/zoo.yaml"  # what `tswitch zoo demo` (and `tswitch demo`) writes: the examples' zoo


@app.command(epilog=f"Example: `tswitch build --zoo {_DEMO_ZOO} --out .tswitch/demo/switches --alpha 0.6 --alpha 0.8`")
@user_errors
@with_run_options()
def build(
    zoo: str = typer.Option(..., "--zoo", "-z", help="Zoo manifest (YAML), local path or fsspec URL."),
    out_uri: str = typer.Option(..., "--out", "-o", help="Artifact URI (folder or s3://bucket/prefix)."),
    alpha: list[float] = typer.Option([0.6], "--alpha", "-a", help="Discard ratio α in [0, 1); repeat for several (one pass for all). "
                                      "α = 0 is not lossless: every changed element becomes θ0 ± knob (only the sign is kept)."),
    scope: str = typer.Option("tensor", "--scope", help="Threshold and knob scope: 'tensor' (authors' code) or 'model' (paper text)."),
    cut: Optional[str] = typer.Option(None, "--cut", help="Threshold cut rule: 'authors' (default for scope "
                                      "'tensor', the authors' code: the int(n(1-α)) largest of each sign plus every "
                                      "value tied with the cut) or 'exact' (default for scope 'model': drop the "
                                      "floor(α·n) smallest, ties at the cut dropped too). 'authors' needs scope 'tensor'."),
    knob: str = typer.Option("rms", "--knob", help="Switch knob: 'rms' (authors' code) or 'mean' (least squares)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a committed artifact set built with other options (its versions are dropped)."),
    shard_mb: int = typer.Option(8, "--shard-mb", help="Target shard size in MiB of one checkpoint."),
    chunk_mb: float = typer.Option(64, "--chunk-mb", help="Tensors above this many MiB of fp32 task vector are "
                                   "read and processed in row blocks of about this size (same output bytes; "
                                   "bounds a worker's memory). 0: never."),
    run: RunOptions = ...,
) -> None:
    """Build T-Switch artifacts (mask, sign, knob) for every task and α of a zoo.

    Streams the checkpoints tensor by tensor, shards them over Ray, writes
    Parquet parts and commits a manifest last. Rerunning an interrupted build
    with the same command reuses the finished shards. Onto an --out built from
    the same base with the same options, only the tasks added or whose
    checkpoint changed are computed and a new version of the set is committed
    (the others' parts are referenced, not copied); with nothing changed the
    build prints "up to date" and does nothing.
    """
    from tswitch_ray.distributed.build import BuildConfig, run_build

    if 0.0 in alpha:
        console.print(ALPHA_ZERO_WARNING, highlight=False, markup=False)
    cfg = BuildConfig(zoo=zoo, out=out_uri, alphas=alpha, scope=scope, cut=cut, knob=knob, overwrite=overwrite,
                      shard_bytes=shard_mb * 2**20, chunk_bytes=int(chunk_mb * 2**20) or None, run=_auto_executor(run))
    s = run_build(cfg)
    if s.up_to_date:
        out.print(f"up to date: {s.out} version {s.version} already holds these {s.tasks} tasks built with these "
                  "options; nothing to do.")
        return
    t = Table(title=f"build committed: {s.out}", show_header=False)
    t.add_row("version", str(s.version))
    t.add_row("tasks x α", f"{s.tasks} x {s.alphas}")
    t.add_row("tasks computed / reused", _task_counts(s))
    t.add_row("scope, cut", f"{s.scope}, {s.cut}")
    t.add_row("shards (reused)", f"{s.shards} ({s.shards_reused})")
    t.add_row("bytes read", _bytes(s.bytes_read))
    t.add_row("time", f"{s.seconds:.1f} s")
    t.add_row("phases", ", ".join(f"{name} {sec:.1f} s" for name, sec in s.phase_seconds.items()))
    for a, (enc, fp32) in s.storage_by_alpha.items():
        t.add_row(f"storage α={a:g}", f"{_bytes(enc)} = {100 * enc / fp32 if fp32 else 0.0:.2f} % of {_bytes(fp32)} fp32 task vectors")
    t.add_row("storage total", f"{_bytes(s.encoded_bytes)} = {100 * s.ratio:.2f} % of {_bytes(s.fp32_bytes)} "
              f"(fp32 task vectors once per α)")
    if s.task_tensor_bytes:
        t.add_row("task-specific", f"{_bytes(s.task_tensor_bytes)} (each task's own heads and buffers, lossless)")
    for task, km in s.key_maps.items():
        rules = ", ".join(f"{old!r} -> {new!r}" for old, new in km["rules"])
        t.add_row(f"keys of {task}", f"{rules}" + (" (detected)" if km["detected"] else ""))
    t.add_row("peak RSS per worker", ", ".join(_bytes(v) for v in sorted(s.peak_rss_by_worker.values(), reverse=True)[:8]))
    out.print(t)


def _task_counts(s: Any) -> str:
    """The build line of what a version computed and what it kept from the previous one."""
    line = (f"{len(s.tasks_computed)} / {len(s.tasks_reused)} (parts {s.parts_computed} / {s.parts_reused})"
            + (f"; removed {', '.join(s.tasks_removed)}" if s.tasks_removed else ""))
    return line + (f"; computed {', '.join(s.tasks_computed)}" if s.tasks_reused and s.tasks_computed else "")


@app.command(epilog="Examples: `tswitch reconstruct --artifacts .tswitch/demo/switches --task digits --alpha 0.6 "
                     "--out digits.safetensors`; `tswitch reconstruct --artifacts switches --task sst2 --alpha 0.6 "
                     "--format hf --out sst2/` (a folder from_pretrained loads)")
@user_errors
@with_run_options(execution=False)
def reconstruct(
    artifacts: str = typer.Option(..., "--artifacts", help="Committed artifact URI."),
    task: str = typer.Option(..., "--task", "-t", help="Task name."),
    alpha: float = typer.Option(..., "--alpha", "-a", help="One of the artifact set's α."),
    out_file: str = typer.Option(..., "--out", "-o", help="Output .safetensors (local or URL); with --format hf, a folder."),
    zoo: Optional[str] = typer.Option(None, "--zoo", help="Zoo manifest, if it moved since the build (θ0 is read from it)."),
    version: Optional[int] = typer.Option(None, "--version",
                                          help="Version of the artifact set to read (default: the latest)."),
    fmt: str = typer.Option("safetensors", "--format", help="safetensors: one file; hf: a Hugging Face folder "
                            "(the task's config files, shards with an index over --max-shard-size, reconstruct.json last)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="With --format hf: the largest shard (5GB, 500MB, 2GiB)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="With --format hf: replace another committed reconstruction there."),
    run: RunOptions = ...,
) -> None:
    """Write θ0 + λ·M⊙S for one task and α as a full state dict."""
    from tswitch_ray.reconstruct import reconstruct_task, reconstruct_task_hf

    if fmt == "hf":
        path = reconstruct_task_hf(artifacts, task, alpha, out_file, zoo_uri=zoo, storage_options=run.storage_options,
                                   max_shard_size=max_shard_size, overwrite=overwrite, version=version)
    elif fmt == "safetensors":
        path = reconstruct_task(artifacts, task, alpha, out_file, zoo_uri=zoo, storage_options=run.storage_options,
                                version=version)
    else:
        raise ConfigError(f"--format {fmt!r}: use safetensors or hf.")
    out.print(f"wrote {path}")


class _MergeCommand(typer.core.TyperCommand):
    """`tswitch merge`, whose help lists the merge methods of the registry.

    The list is built when help is shown, not at import: the registry imports
    torch, which every other command would pay for.
    """

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from tswitch_ray.methods import registered

        lines = []
        for info in registered():
            if info.kind.is_merge:
                opts = ", ".join(f"{k}={v}" for k, v in info.defaults().items())
                aliases = "".join(f", alias {a}" for a in info.aliases)
                lines.append(f"- `{info.name}` ({info.kind.value}{aliases}): {info.summary}"
                             + (f" Options: {opts}." if opts else ""))
        self.epilog = "**Methods:**\n\n" + "\n".join(lines) + "\n\n" + _MERGE_EXAMPLES
        super().format_help(ctx, formatter)


_MERGE_EXAMPLES = (f"Examples: `tswitch merge --zoo {_DEMO_ZOO} --method ties --out merged/ -O k=20 -O scale=0.3`; "
                   f"`tswitch merge --zoo {_DEMO_ZOO} --method emr --out emr/`; "
                   "`tswitch merge --zoo zoo.yaml --method ta --format hf --out ta/` (ta/merged/ loads with from_pretrained)")


def _method_options(pairs: list[str] | None) -> dict[str, Any]:
    """``-O KEY=VALUE`` pairs, values JSON-decoded where they parse (20 -> 20, mean -> 'mean')."""
    bad = [p for p in pairs or [] if "=" not in p]
    if bad:
        raise ConfigError(f"--option expects KEY=VALUE (e.g. -O k=20), got {bad[0]!r}.")
    return _storage_options(pairs, None)


@app.command(cls=_MergeCommand, epilog=_MERGE_EXAMPLES)
@user_errors
@with_run_options()
def merge(
    zoo: str = typer.Option(..., "--zoo", "-z", help="Zoo manifest."),
    method: str = typer.Option(..., "--method", "-m", help="A merge method (listed below) or an alias."),
    out_dir: str = typer.Option(..., "--out", "-o", help="Output folder: merged.safetensors (one-model merges) or TASK.safetensors per task (per-task merges), then merge.json."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-O",
                                               help="Method option KEY=VALUE (repeatable); see the methods below."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a committed merge of another method, options or zoo."),
    fmt: str = typer.Option("safetensors", "--format", help="safetensors: one file per model; hf: a Hugging Face folder "
                            "per model (OUT/merged/ or OUT/TASK/: config files, shards with an index) from_pretrained loads."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="With --format hf: the largest shard (5GB, 500MB, 2GiB)."),
    chunk_mb: float = typer.Option(64, "--chunk-mb", help="ta and avg merge tensors above this many MiB of fp32 "
                                   "task vector in row blocks (same output bytes). 0: never."),
    run: RunOptions = ...,
) -> None:
    """Merge a zoo with one method, streamed and sharded over Ray."""
    from tswitch_ray.distributed.merge import MergeConfig, run_merge

    if fmt not in ("safetensors", "hf"):
        raise ConfigError(f"--format {fmt!r}: use safetensors or hf.")
    opts = _method_options(option)  # run_merge checks the method, its kind and options before any work
    cfg = MergeConfig(zoo=zoo, method=method, out=out_dir, options=opts, overwrite=overwrite, run=_auto_executor(run),
                      output_format=fmt, max_shard_size=max_shard_size, chunk_bytes=int(chunk_mb * 2**20) or None)
    s = run_merge(cfg)
    if s.up_to_date:
        out.print(f"up to date: {s.out} holds the {s.method} merge of these tasks and checkpoints; nothing to do.")
        return
    for p in s.outputs:
        out.print(f"wrote {p}")
    out.print(f"{s.shards} shards, {_bytes(s.bytes_read)} read, {s.seconds:.1f} s "
              f"({', '.join(f'{name} {sec:.1f} s' for name, sec in s.phase_seconds.items())})")


@zoo_app.command("synth", epilog="Examples: `tswitch zoo synth --arch vit-b-32 --tasks 8 --dtype fp16 --out zoo-b32`; "
                                  "`tswitch zoo synth --arch llama-1b --layers 4 --tasks 8 --out zoo-llama`")
@user_errors
def zoo_synth(
    arch: str = typer.Option("vit-b-32", "--arch", help="vit-b-32, vit-b-16 or vit-l-14 (open_clip vision tower "
                             "shapes); llama-1b, llama-8b-embed or llama-tiny (HF Llama checkpoint folders)."),
    tasks: int = typer.Option(8, "--tasks", help="Number of fine-tuned checkpoints."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp16, fp32 or bf16 [default: fp16; bf16 for llama-*]."),
    out_dir: str = typer.Option(..., "--out", "-o", help="Output folder."),
    seed: int = typer.Option(0, "--seed"),
    layers: Optional[int] = typer.Option(None, "--layers", help="Truncate to this many transformer blocks (fast tests)."),
    tied: Optional[bool] = typer.Option(None, "--tied/--untied", help="llama-*: tie lm_head to the embedding "
                                        "(no lm_head.weight in the files) [default: the preset's]."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="llama-*: bytes per safetensors shard "
                                             "[default: 2 GiB]."),
) -> None:
    """Generate a synthetic zoo: real safetensors with real ViT or Llama tensor names and shapes, fine-tune-like task vectors."""
    from tswitch_ray.zoo.synth import synth_zoo

    dtype = dtype or ("bf16" if arch.startswith("llama") else "fp16")
    path = synth_zoo(arch, tasks, dtype, out_dir, seed=seed, layers=layers, tied=tied, shard_bytes=shard_size)
    out.print(f"wrote {path}")


@zoo_app.command("convert", epilog="Examples: `tswitch zoo convert finetuned.pt finetuned.safetensors --trust-pickle`; "
                                     "`tswitch zoo convert ckpts/*.pt --out-dir zoo/ --trust-pickle`")
@user_errors
def zoo_convert(
    paths: list[str] = typer.Argument(..., help="SRC DST.safetensors, or with --out-dir: one or more SRC checkpoints "
                                                "(.pt/.bin: a state dict, or with --trust-pickle a whole module)."),
    out_dir: Optional[str] = typer.Option(None, "--out-dir", help="Convert every SRC to OUT_DIR/<name>.safetensors."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Unpickle SRC (runs code inside it: only for files "
                                                                     "you trust); a plain state dict needs no trust."),
) -> None:
    """One-time conversion of torch checkpoints to safetensors, streamed tensor by tensor (memory: about one tensor)."""
    from tswitch_ray.zoo.convert import convert_checkpoint, convert_checkpoints

    if out_dir is not None:
        written = convert_checkpoints(paths, out_dir, trust_pickle=trust_pickle)
    elif len(paths) == 2 and paths[1].lower().endswith(".safetensors"):
        convert_checkpoint(paths[0], paths[1], trust_pickle=trust_pickle)
        written = [paths[1]]
    else:
        raise ConfigError("zoo convert takes SRC DST.safetensors, or several SRC with --out-dir DIR; "
                          f"got {len(paths)} path(s) and no --out-dir.")
    for w in written:
        out.print(f"wrote {w}")


@registry_app.command("query", epilog="Example: `tswitch registry query \"select uri, n_tasks, ratio from artifacts "
                                      "order by ratio\" --root .tswitch/demo`")
@user_errors
@with_run_options(execution=False)
def registry_query(
    sql: str = typer.Argument(..., help="SQL over the views artifacts, switches, results."),
    root: str = typer.Option(".tswitch", "--root", help="Root URI under which artifact sets and results live."),
    fmt: str = typer.Option("table", "--format", help="table (a wide result becomes one block per row), csv, json or "
                                                    "markdown."),
    verify_parts: bool = typer.Option(False, "--verify-parts", help="Also read and hash every part of every set "
                                      "(a set whose parts were replaced is then listed valid = false)."),
    run: RunOptions = ...,
) -> None:
    """Run SQL over the artifact catalog (duckdb)."""
    from tswitch_ray.artifacts.registry import Registry
    from tswitch_ray.render import FORMATS, render_query

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is unknown; use one of {', '.join(FORMATS)}.")
    render_query(Registry(root, storage_options=run.storage_options, verify_parts=verify_parts).query(sql), fmt, out)


@registry_app.command("versions", epilog="Example: `tswitch registry versions .tswitch/demo/switches`")
@user_errors
@with_run_options(execution=False)
def registry_versions(
    root: str = typer.Argument(..., help="An artifact set, or a root under which artifact sets live."),
    run: RunOptions = ...,
) -> None:
    """List the committed versions of artifact sets and the tasks each added, removed, replaced and kept."""
    from tswitch_ray.artifacts.registry import Registry

    table = Registry(root, storage_options=run.storage_options).query(
        "select uri, version, current, created_at, n_tasks, added, removed, replaced, len(kept) as kept, valid "
        "from versions order by uri, version")
    for uri in dict.fromkeys(table.column("uri").to_pylist()):
        t = Table(*table.column_names[1:], title=uri)
        for row in table.to_pylist():
            if row.pop("uri") == uri:
                t.add_row(*(", ".join(v) if isinstance(v, list) else str(v) for v in row.values()))
        out.print(t)


def _print_eval(result: Any) -> None:
    from tswitch_ray.eval.weights import StorageModel  # noqa: F401 - keeps the import cost inside the command

    tasks = list(dict.fromkeys(r["task"] for r in result.rows))
    individual = next((x["storage_bytes"] for x in result.summary if x["method"] == "individual"), None)
    from tswitch_ray.eval.reporting import column_labels

    short = column_labels(tasks)
    legend = ", ".join(f"{short[task]}={task}" for task in tasks if short[task] != task)
    t = Table(title=f"{result.name}: accuracy (%) per task, average and storage", caption=("tasks: " + legend) if legend else None)
    t.add_column("method", style="bold", no_wrap=True)
    for task in tasks:
        t.add_column(short[task], justify="right")
    t.add_column("avg", justify="right", style="bold")
    t.add_column("storage", justify="right")
    if individual:
        t.add_column("vs individual", justify="right")
    for s in result.summary:
        cells = [f"{100 * s['per_task'][k]:.1f}" if k in s["per_task"] else "–" for k in tasks]
        sb = s["storage_bytes"]
        row = [s["label"], *cells, f"{100 * s['average']:.1f}", _bytes(sb) if sb >= 0 else "–"]
        if individual:
            row.append(f"{100 * sb / individual:.1f} %" if sb >= 0 else "–")
        t.add_row(*row)
    Console(width=max(out.width, 132)).print(t)  # a results table is worth a wide line even on a narrow terminal
    for s in result.summary:
        if s.get("throughput_ratio") is not None:
            out.print(f"{s['label']}: throughput {s['throughput_ratio']:.2f}x of single-model inference")
    out.print(f"results: {result.files.get('results.md', result.work_dir)}; plot: "
              f"{result.files.get('accuracy_vs_storage.png', '')}; {result.seconds:.0f} s"
              + (f"; MLflow run {result.run_id}" if result.run_id else ""))


TrackingOpt = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: config, $MLFLOW_TRACKING_URI, ./mlruns).")
NoTrackingOpt = typer.Option(False, "--no-tracking", help="Do not log to MLflow.")


def _evaluation_command(require_grid: bool, config_help: str) -> Callable[..., None]:
    """`tswitch eval` and `tswitch sweep`: one command, except that a sweep's config must have a `grid:`."""

    def command(
        config: str = typer.Argument(..., help=config_help),
        tracking_uri: Optional[str] = TrackingOpt,
        no_tracking: bool = NoTrackingOpt,
        work_dir: Optional[str] = typer.Option(None, "--work-dir", help="Where merges, cached cells and results go "
                                               "(default runs/NAME, NAME the config's `name`)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N eval rows per task (smoke runs)."),
        run: RunOptions = ...,
    ) -> None:
        from tswitch_ray.distributed.eval_runner import run_eval
        from tswitch_ray.eval.config import load_eval_config

        overrides: dict[str, Any] = {"run": run.explicit(), "work_dir": work_dir, "limit": limit}
        if tracking_uri or no_tracking:
            overrides["tracking"] = {"uri": tracking_uri, "enabled": not no_tracking}
        cfg = load_eval_config(config, overrides, storage_options=run.storage_options or None)
        if require_grid and not cfg.grid:
            raise ConfigError(f"{config}: a sweep config needs a `grid:` list "
                              "(e.g. - {method: [dare], options.p: [0.1, 0.5]}).")
        _print_eval(run_eval(cfg, show_progress=cfg.run.show_progress, say=lambda m: console.print(m, highlight=False)))

    return command


def _register_evaluation(name: str, require_grid: bool, config_help: str, help: str, epilog: str) -> None:
    command = with_run_options()(_evaluation_command(require_grid, config_help))
    app.command(name, help=help, epilog=epilog)(user_errors(command))


_register_evaluation(
    "eval", require_grid=False,
    config_help="Eval config (YAML): zoo, artifacts, methods, optional `run:`; see pipelines/evals/.",
    help="Evaluate merging methods on a zoo: Ray tasks per (method, task), one MLflow run, a results table.\n\n"
         "Finished (method, task) cells are cached under the work dir, so rerunning after an interruption "
         "recomputes only what is missing. Run options given here override the config's `run:`.",
    epilog="Example: `tswitch eval pipelines/evals/main_table.yaml --tracking-uri http://127.0.0.1:5000`")
_register_evaluation(
    "sweep", require_grid=True,
    config_help="Eval config with a `grid:` (methods × options); see pipelines/sweeps/.",
    help="Run a grid of methods × options; resumable (every finished cell is cached).\n\n"
         "Run options given here override the config's `run:`.",
    epilog="Example: `tswitch sweep pipelines/sweeps/discard_ratio.yaml` (rerun the same command to resume)")


@app.command(epilog="Example: `tswitch demo` (first run builds the demo zoo, ~5 min on 2 cores; later runs reuse it)")
@user_errors
@with_run_options(storage=False)
def demo(
    root: str = typer.Option(".tswitch/demo", "--root", help="Where the demo zoo, switches, results and MLflow store go."),
    alpha: list[float] = typer.Option(list((0.6, 0.8, 0.9)), "--alpha", "-a", help="T-Switch discard ratios to build."),
    wemoe: bool = typer.Option(True, "--wemoe/--no-wemoe", help="Include WEMoE and E-WEMoE (test-time adaptation)."),
    tracking_uri: Optional[str] = TrackingOpt,
    no_tracking: bool = NoTrackingOpt,
    run: RunOptions = ...,
) -> None:
    """The whole pipeline on the embedded demo zoo: zoo → Ray build → Ray eval → MLflow → table + plot."""
    from tswitch_ray.demo import DemoOptions, run_demo

    opts = DemoOptions(root=root, alphas=tuple(alpha), wemoe=wemoe, tracking_uri=tracking_uri,
                       tracking=not no_tracking, run=run)
    _print_eval(run_demo(opts, say=lambda m: console.print(m, highlight=False)))


@zoo_app.command("demo", epilog="Example: `tswitch zoo demo --out .tswitch/demo/zoo`")
@user_errors
def zoo_demo(
    out_dir: str = typer.Option(".tswitch/demo/zoo", "--out", "-o", help="Folder for zoo.yaml, checkpoints, heads and eval data."),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a cached build with this recipe exists."),
) -> None:
    """Build the offline demo zoo: a tiny open_clip ViT pretrained here, fine-tuned on 8 tasks (cached)."""
    import json as _json

    from tswitch_ray.eval.demo_zoo import build_demo_zoo

    path = build_demo_zoo(out_dir, seed=seed, force=force, progress=lambda m: console.print(m, highlight=False))
    report = Path(path).parent / "zoo_report.json"
    if report.exists():
        rep = _json.loads(report.read_text())
        t = Table(title=f"demo zoo: {path}")
        for col in ("task", "base acc", "fine-tuned acc"):
            t.add_column(col)
        for task, r in (rep.get("tasks") or {}).items():
            t.add_row(task, f"{100 * r.get('base_accuracy', float('nan')):.1f}",
                      f"{100 * r.get('finetuned_accuracy', float('nan')):.1f}")
        out.print(t)
    out.print(str(path))


@zoo_app.command("real", epilog="Example: `tswitch zoo real --out .tswitch/real/zoo`")
@user_errors
def zoo_real(
    out_dir: str = typer.Option(".tswitch/real/zoo", "--out", "-o", help="Folder for zoo.yaml, checkpoints, heads and eval data."),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a cached build with this recipe exists."),
) -> None:
    """Build the real-model zoo: the silero-vad wheel's pretrained network fine-tuned here on 4 real-data tasks (cached)."""
    from tswitch_ray.eval.real_zoo import build_real_zoo

    path = build_real_zoo(out_dir, seed=seed, force=force, progress=lambda m: console.print(m, highlight=False))
    out.print(str(path))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
