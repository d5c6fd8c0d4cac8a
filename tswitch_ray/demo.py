"""`tswitch demo`: the whole product on the embedded demo zoo, on one laptop.

1. build (or reuse) the demo zoo — a tiny open_clip ViT pretrained and
   fine-tuned here on 8 tasks (:mod:`tswitch_ray.eval.demo_zoo`);
2. start a local Ray;
3. build T-Switch artifacts for a few α (the Ray build pipeline);
4. evaluate Individual, Task Arithmetic, TIES, EMR, T-Switch, Auto-Switch
   (and WEMoE / E-WEMoE) with the Ray eval runner, logged to a local MLflow store;
5. print the results table and write the accuracy-vs-storage plot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ConfigDict

from tswitch_ray.distributed.build import BuildConfig, run_build
from tswitch_ray.distributed.eval_runner import EvalResult, run_eval
from tswitch_ray.eval.config import EvalConfig, MethodSpec
from tswitch_ray.eval.demo_zoo import build_demo_zoo
from tswitch_ray.options import WithRunOptions
from tswitch_ray.tracking import TrackingConfig

DEFAULT_ALPHAS = (0.6, 0.8, 0.9)


class DemoOptions(WithRunOptions):
    """What `tswitch demo` runs: where, which α, whether WEMoE; how it runs is ``run`` (flat fields accepted)."""

    model_config = ConfigDict(extra="forbid")

    root: str = ".tswitch/demo"
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    wemoe: bool = True
    tracking_uri: str | None = None
    tracking: bool = True
    seed: int = 0


def demo_methods(alphas: Sequence[float], wemoe: bool) -> list[MethodSpec]:
    """The demo's table of method specs (``wemoe``: add WEMoE and E-WEMoE, whose router training is slow)."""
    specs = [
        MethodSpec(method="base", label="Base (pretrained)"),
        MethodSpec(method="individual", label="Individual"),
        MethodSpec(method="ta", options={"scale": 0.3}, label="Task Arithmetic"),
        MethodSpec(method="ties", options={"k": 20.0, "scale": 0.3}, label="TIES"),
        MethodSpec(method="emr", label="EMR"),
    ]
    specs += [MethodSpec(method="tswitch", alpha=a, label=f"T-Switch α={a:g}") for a in alphas]
    specs.append(MethodSpec(method="autoswitch", alpha=alphas[0], label=f"Auto-Switch α={alphas[0]:g}"))
    if wemoe:
        specs += [MethodSpec(method="wemoe", label="WEMoE"),
                  MethodSpec(method="e-wemoe", options={"keep_fraction": 0.1}, label="E-WEMoE (90 % pruned)")]
    return specs


def run_demo(opts: DemoOptions, say: Callable[[str], None] = print) -> EvalResult:
    """Steps 1-5 above; one Ray runtime serves the build and the evaluation."""
    import ray

    owns_ray = False
    if opts.run.executor == "ray" and not ray.is_initialized():
        from tswitch_ray.distributed.executor import RayExecutor

        RayExecutor(address=opts.run.ray_address, num_cpus=opts.run.num_workers)  # connects (or starts) with clear errors
        owns_ray = True
    try:
        return _run_demo(opts, say)
    finally:
        if owns_ray:
            ray.shutdown()


def _run_demo(opts: DemoOptions, say: Callable[[str], None]) -> EvalResult:
    root = Path(opts.root).resolve()
    zoo_dir = root / "zoo"
    say(f"[1/4] demo zoo in {zoo_dir} (built once, then cached)")
    zoo_yaml = build_demo_zoo(zoo_dir, seed=opts.seed, progress=lambda m: say(f"      {m}"))
    switches = root / "switches"
    say(f"[2/4] T-Switch artifacts for α ∈ {list(opts.alphas)} → {switches}")
    summary = run_build(BuildConfig(zoo=str(zoo_yaml), out=str(switches), alphas=list(opts.alphas), run=opts.run))
    say(f"      {summary.shards} shards ({summary.shards_reused} reused) in {summary.seconds:.1f} s")
    cfg = EvalConfig(
        name="demo", zoo=str(zoo_yaml), artifacts=str(switches), methods=demo_methods(opts.alphas, opts.wemoe),
        work_dir=str(root / "eval"), run=opts.run,
        tracking=TrackingConfig(enabled=opts.tracking, uri=opts.tracking_uri or str(root / "mlruns"),
                                experiment="tswitch-demo"),
    )
    say("[3/4] evaluating methods on Ray (one task per method × task)")
    result = run_eval(cfg, show_progress=opts.run.show_progress, say=lambda m: say(f"      {m}"))
    say(f"[4/4] results in {result.work_dir} (results.md, results.csv, accuracy_vs_storage.png); "
        f"MLflow store {cfg.tracking.resolved_uri()}")
    return result
