"""Prometheus text exposition of the federation's status, plus HTTP request counters.

Rendered from the same ``status()`` dict that ``/v1/status`` serves, so the two never disagree.
"""

from __future__ import annotations

from collections import Counter


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        tag = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{tag}}} {value:g}" if tag else f"{name} {value:g}")
    return lines


def render(status: dict, requests: Counter) -> str:
    """``requests`` counts (route, HTTP status) pairs."""
    lines = []
    lines += _family("stamen_version", "gauge", "Published global model version.", [({}, status["version"])])
    lines += _family("stamen_global_step", "gauge", "Global inner step counter (drives the lr schedule).",
                     [({}, status["global_step"])])
    lines += _family("stamen_buffered_updates", "gauge", "Updates waiting in the aggregation buffer.",
                     [({}, status["buffered"])])
    lines += _family("stamen_tasks_in_flight", "gauge", "Tasks issued and not yet uploaded.", [({}, status["in_flight"])])
    lines += _family("stamen_tasks", "gauge", "Tasks by state.", [({"state": k}, v) for k, v in sorted(status["tasks"].items())])
    lines += _family("stamen_tier_updates_total", "counter", "Accepted updates per tier.",
                     [({"tier": t}, v["updates"]) for t, v in status["tiers"].items()])
    lines += _family("stamen_tier_tokens_total", "counter", "Tokens trained in accepted updates per tier.",
                     [({"tier": t}, v["tokens"]) for t, v in status["tiers"].items()])
    lines += _family("stamen_clients", "gauge", "Clients joined.", [({}, status["client_count"])])
    lines += _family("stamen_client_updates_total", "counter", "Accepted updates per client.",
                     [({"client": c["client_id"], "tier": c["tier"], "role": c["role"]}, c["updates"]) for c in status["clients"]])
    lines += _family("stamen_client_tokens_total", "counter", "Tokens trained per client.",
                     [({"client": c["client_id"], "tier": c["tier"], "role": c["role"]}, c["tokens"]) for c in status["clients"]])
    lines += _family("stamen_tensors_covered", "gauge", "Global tensors some accepted update has trained.",
                     [({}, status["tensors"]["covered"])])
    evals = status.get("evaluations", [])
    lines += _family("stamen_val_loss", "gauge", "Held-out loss (nats/token) of each evaluated version.",
                     [({"version": str(e["version"])}, e["val_loss"]) for e in evals])
    lines += _family("stamen_val_loss_latest", "gauge", "Held-out loss of the newest evaluated version.",
                     [({}, evals[-1]["val_loss"])] if evals else [])
    if "privacy" in status:
        lines += _family("stamen_privacy_epsilon", "gauge", f"Privacy spent: epsilon at delta {status['privacy']['delta']:g}.",
                         [({}, status["privacy"]["epsilon"])])
        lines += _family("stamen_privacy_stopped", "gauge", "1 once the privacy budget stopped training.",
                         [({}, float(status["privacy"]["stopped"]))])
    lines += _family("stamen_http_requests_total", "counter", "HTTP requests by route and status.",
                     [({"route": r, "code": str(c)}, n) for (r, c), n in sorted(requests.items())])
    return "\n".join(lines) + "\n"
