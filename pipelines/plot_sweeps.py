"""Plot the paper-reproduction sweeps from their ``summary.json`` (written by `tswitch sweep`).

Usage, from the repository root after running the three sweeps::

    python pipelines/plot_sweeps.py --runs runs --out docs/img

Writes ``sweep_discard_ratio.png`` (DARE vs P-Discard merging against the
discard ratio), ``sweep_tswitch_alpha_knob.png`` (T-Switch accuracy and storage
against α for both knob modes) and ``sweep_autoswitch_m_k.png`` (Auto-Switch
accuracy and throughput over examples per task m and neighbours k). A sweep
whose folder is missing is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _summary(runs: Path, name: str) -> list[dict] | None:
    path = runs / name / "summary.json"
    if not path.exists():
        print(f"skip {name}: {path} not found (run `tswitch sweep pipelines/sweeps/{name.replace('-', '_')}.yaml`)")
        return None
    return json.loads(path.read_text())


def plot_discard_ratio(rows: list[dict], out: Path) -> None:
    base = next(r for r in rows if r["method"] == "ta")
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    series = (
        ("pdiscard", "alpha", None, "P-Discard (drop smallest), eq. 4"),
        ("dare", "p", True, "DARE-Random, eq. 4 (the paper's control)"),
        ("dare", "p", False, "DARE + Task Arithmetic"),
    )
    for method, key, norm, label in series:
        pts = sorted((r["options"][key], 100 * r["average"]) for r in rows if r["method"] == method
                     and (norm is None or bool(r["options"].get("rescale_to_sum_norm", False)) == norm))
        if not pts:
            continue
        ax.plot([0.0] + [p[0] for p in pts], [100 * base["average"]] + [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("discard ratio")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title("Merging after discarding (paper 000, Table 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep_discard_ratio.png")
    plt.close(fig)


def plot_tswitch_alpha_knob(rows: list[dict], out: Path) -> None:
    indiv = next(r for r in rows if r["method"] == "individual")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for mode in ("rms", "mean"):
        pts = sorted((r["alpha"], 100 * r["average"], r["storage_bytes"]) for r in rows
                     if r["method"] == "tswitch" and r["label"].endswith(f"switches-{mode}]"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"knob = {mode}")
        if mode == "rms":  # storage does not depend on the knob mode
            ax2.plot([p[0] for p in pts], [100 * p[2] / indiv["storage_bytes"] for p in pts], marker="o", color="gray")
    ax.axhline(100 * indiv["average"], color="k", ls="--", lw=1, label="Individual")
    ax.set_xlabel("α (fraction of τ discarded)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title("T-Switch accuracy vs α and knob")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.set_xlabel("α")
    ax2.set_ylabel("storage vs Individual (%)")
    ax2.set_title("storage (base + 8 switches)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "sweep_tswitch_alpha_knob.png")
    plt.close(fig)


def plot_autoswitch_m_k(rows: list[dict], out: Path) -> None:
    auto = [r for r in rows if r["method"] == "autoswitch"]
    ms = sorted({r["options"]["examples_per_task"] for r in auto})
    ks = sorted({r["options"]["k"] for r in auto})
    cell = {(r["options"]["examples_per_task"], r["options"]["k"]): r for r in auto}
    oracle = next((r for r in rows if r["method"] == "tswitch"), None)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for ax, key, title, fmt in ((axes[0], "average", "accuracy (%)", "{:.1f}"), (axes[1], "throughput_ratio", "throughput vs one model (×)", "{:.2f}")):
        grid = [[(100 if key == "average" else 1) * (cell[(m, k)][key] or 0.0) for k in ks] for m in ms]
        im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, fmt.format(v), ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_yticks(range(len(ms)), [str(m) for m in ms])
        ax.set_xlabel("k (neighbours)")
        ax.set_ylabel("m (examples per task)")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    if oracle:
        fig.suptitle(f"Auto-Switch α=0.6; T-Switch with the true task: {100 * oracle['average']:.1f} %", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "sweep_autoswitch_m_k.png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs", help="folder holding the sweeps' work dirs (default: runs)")
    ap.add_argument("--out", default="docs/img", help="where the PNGs go (default: docs/img)")
    args = ap.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, plot in (("discard-ratio", plot_discard_ratio), ("tswitch-alpha-knob", plot_tswitch_alpha_knob),
                       ("autoswitch-m-k", plot_autoswitch_m_k)):
        rows = _summary(runs, name)
        if rows is not None:
            plot(rows, out)
            print(f"wrote {out}/sweep_{name.replace('-', '_')}.png")


if __name__ == "__main__":
    main()
