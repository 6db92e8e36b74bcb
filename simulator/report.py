"""The simulation report's plots, drawn from ``summary.json`` alone (so a report can be redrawn
without rerunning): validation loss against virtual time and against tokens (with the GPU nodes
alone and the centralized baseline on the same axes) and per text domain, who contributed what,
traffic, utilisation, staleness."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def domains(row: dict) -> list[str]:
    """The validation domains an evaluation row reports besides all text ("public" and
    "private" where the devices hold text of their own)."""
    return [k.removeprefix("val_") for k in row if k.startswith("val_") and k != "val_loss"]


def plot_loss(summary: dict, path: Path) -> None:
    """Validation loss against virtual time (beside the GPU nodes alone) and against tokens
    (beside centralized training too), and, with private device text, the final loss per
    domain: the text only the devices hold is where they should count."""
    runs = [("federated", summary)] + ([("GPU nodes alone", summary["gpu_only"])] if "gpu_only" in summary else [])
    held = domains(summary["evals"][-1])
    fig, axes = plt.subplots(1, 3 if held else 2, figsize=(18 if held else 12, 4.5))
    ax_t, ax_n = axes[0], axes[1]
    for name, run in runs:
        evals = run["evals"]
        ax_t.plot([e["time_h"] * 60 for e in evals], [e["val_loss"] for e in evals], marker="o", ms=3, label=name)
        ax_n.plot([e["tokens"] / 1e6 for e in evals], [e["val_loss"] for e in evals], marker="o", ms=3, label=name)
    ax_t.set(xlabel="virtual time (minutes)", ylabel="validation loss (nats/byte)", title="Loss vs virtual time")
    if "baseline" in summary:
        tokens, losses = zip(*summary["baseline"]["val_curve"])
        ax_n.plot([t / 1e6 for t in tokens], losses, marker="s", ms=3, label="centralized, same tokens")
    ax_n.set(xlabel="tokens trained (millions)", ylabel="validation loss (nats/byte)", title="Loss vs tokens")
    if held:
        ax_d = axes[2]
        bars = [(name, [run["evals"][-1][f"val_{d}"] for d in held]) for name, run in runs]
        if "final_by_domain" in summary.get("baseline", {}):
            bars.append(("centralized, same tokens", [summary["baseline"]["final_by_domain"][d] for d in held]))
        width = 0.8 / len(bars)
        for i, (name, values) in enumerate(bars):
            at = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(held))]
            ax_d.bar(at, values, width=width, label=name)
            for x, v in zip(at, values):
                ax_d.annotate(f"{v:.3f}", (x, v), ha="center", va="bottom", fontsize=8)
        ax_d.set_xticks(range(len(held)), [f"{d} text" for d in held])
        ax_d.set(ylabel="final validation loss (nats/byte)", title="Final loss by who holds the text")
        ax_d.set_ylim(bottom=min(v for _, values in bars for v in values) * 0.9)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_devices(summary: dict, path: Path) -> None:
    """Per hardware class: share of tokens, MiB moved, and utilisation (busy / present time)."""
    classes = sorted(summary["per_class"])
    rows = [summary["per_class"][c] for c in classes]
    total = max(1, sum(r["tokens"] for r in rows))
    span_s = max(summary["end_time_h"] * 3600, 1e-9)
    fig, (ax_c, ax_b, ax_u) = plt.subplots(1, 3, figsize=(15, 4.5))
    ax_c.bar(classes, [100 * r["tokens"] / total for r in rows])
    ax_c.set(ylabel="% of accepted tokens", title="Contribution by hardware class")
    x = range(len(classes))
    ax_b.bar([i - 0.2 for i in x], [r["bytes_down"] / 2**20 for r in rows], width=0.4, label="down")
    ax_b.bar([i + 0.2 for i in x], [r["bytes_up"] / 2**20 for r in rows], width=0.4, label="up")
    ax_b.set_xticks(list(x), classes)
    ax_b.set(ylabel="MiB", title="Bytes moved")
    ax_b.legend()
    util = [100 * r["busy_s"] / (summary["devices"][c] * span_s) for c, r in zip(classes, rows)]
    ax_u.bar(classes, util)
    ax_u.set(ylabel="% of run time busy", title="Device utilisation")
    for ax in (ax_c, ax_b, ax_u):
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_staleness(summary: dict, path: Path) -> None:
    hist = summary["staleness_hist"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(range(len(hist)), hist)
    ax.set(xlabel="staleness τ (versions behind when merged)", ylabel="accepted updates",
           title="Staleness of accepted updates")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sync_vs_async(result: dict, path: Path) -> None:
    """The first seed's loss against virtual hours on a log axis (the runs differ by orders of
    magnitude; the evaluation at time 0 cannot be drawn there), the target, when each run
    reached it, and every seed's speed-up in the title."""
    fig, ax = plt.subplots(figsize=(8, 5))
    first = result["seeds"][0]
    target, hours = first["target_val_loss"], first["hours_to_target"]
    for (name, r), colour in zip(first["runs"].items(), ("tab:blue", "tab:orange")):
        evals = [e for e in r["evals"] if e["time_h"] > 0]
        ax.plot([e["time_h"] for e in evals], [e["val_loss"] for e in evals], marker="o", ms=3, color=colour,
                label=f"{name}: {r['versions']} versions")
        if hours[name] is not None:
            ax.axvline(hours[name], color=colour, ls=":", label=f"{name} reaches target at {hours[name]:.3g} h")
    ax.axhline(target, color="grey", ls="--", label=f"target {target:.3f}")
    each = ", ".join("never" if x is None else f"{x:.1f}x" for x in result["async_speedups"])
    median = result["median_async_speedup"]
    title = f"Synchronous rounds vs asynchronous buffer, same devices (seed {first['seed']} drawn)"
    if median is not None:
        title += f"\nasync reaches the target {median:.1f}x sooner (median of seeds: {each})"
    ax.set(xscale="log", xlabel="virtual time (hours, log scale)", ylabel="validation loss (nats/byte)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compare(result: dict, domain: str, path: Path) -> None:
    """One validation domain: every variant of the first seed against virtual time and against
    tokens, the centralized run on the tokens axis, and the medians over seeds in the title."""
    first = result["seeds"][0]
    key = "val_loss" if domain == "all" else f"val_{domain}"
    fig, (ax_t, ax_n) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, r in first["runs"].items():
        evals = r["evals"]
        ax_t.plot([e["time_h"] * 60 for e in evals], [e[key] for e in evals], marker="o", ms=3, label=name)
        ax_n.plot([e["tokens"] / 1e6 for e in evals], [e[key] for e in evals], marker="o", ms=3, label=name)
    central = first["centralized_equal_tokens"]
    if domain == "all":
        tokens, losses = zip(*central["val_curve"])
        ax_n.plot([t / 1e6 for t in tokens], losses, marker="s", ms=3, label="centralized, all text")
    else:
        ax_n.scatter([central["tokens"] / 1e6], [central["final"][domain]], marker="s", color="black",
                     label="centralized, all text (final)")
    if "centralized_devices_tokens" in first:
        few = first["centralized_devices_tokens"]
        ax_n.scatter([few["tokens"] / 1e6], [few["final"][domain]], marker="^", color="black",
                     label="centralized, devices-only's tokens (final)")
    ax_t.set(xlabel="virtual time (minutes)", ylabel=f"validation loss, {domain} text (nats/byte)",
             title=f"seed {first['seed']}, {first['text']} text")
    ax_n.set(xlabel="tokens trained (millions)", ylabel=f"validation loss, {domain} text (nats/byte)")
    medians = ", ".join(f"{name} {m[domain]:.3f}" for name, m in result["median"].items())
    fig.suptitle(f"Final loss on {domain} text, median of {len(result['seeds'])} seeds: {medians}", fontsize=10)
    for ax in (ax_t, ax_n):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(summary: dict, out: Path) -> list[Path]:
    paths = [out / "loss.png", out / "devices.png", out / "staleness.png"]
    for plot, p in zip((plot_loss, plot_devices, plot_staleness), paths):
        plot(summary, p)
    return paths
