"""Presenting ``epruntime bench`` results: the table, the progress bar and the PNG plot."""

from __future__ import annotations

from typing import Any

from epruntime.layer.probe import STAGES


class _Progress:
    """A tqdm bar on rank 0 (plain lines when tqdm is missing); silent elsewhere."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="bench", unit="case")
            except ImportError:  # pragma: no cover - tqdm ships with the dev extra
                self.bar = None
        self.count, self.total = 0, total

    def __call__(self, label: str) -> None:
        if not self.enabled:
            return
        if self.count and self.bar is not None:
            self.bar.update(1)
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label)
        else:
            print(f"bench {self.count}/{self.total}: {label}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()


def progress_bar(total: int, enabled: bool) -> _Progress:
    """A callable taking each case's label as it starts."""
    return _Progress(total, enabled)


def format_bench(report: dict[str, Any]) -> str:
    """The rank-0 table: per-stage medians, tokens/s, expert stage vs dense, bytes per link, peers."""
    head = "case".ljust(30) + "".join(s.rjust(9) for s in STAGES) + "   tok/s   expert/dense  inter-node B/tok"
    lines = [
        f"epruntime bench: {report['world_size']} ranks = {report['nnodes']} x {report['ranks_per_node']} | "
        f"{report['dtype']} | medians of {report['reps']} reps (ms)",
        head,
    ]
    for r in report["cases"]:
        stages = "".join(f"{r['timing_ms'][s]:9.2f}" for s in STAGES)
        lines.append(
            f"{r['case']['label']:<30}{stages}{r['throughput_tokens_per_s']:9.0f}"
            f"{r['fraction_of_dense']:14.2f}{r['traffic_bytes_per_token']['inter_node']:18.0f}"
        )
        peers = r.get("peers", {})
        for impl in ("eager", "grouped_mm"):
            if impl in peers:
                ms, speedup = peers[impl]["total_ms"], peers[impl]["speedup_of_epruntime"]
                lines.append(f"    vs transformers {impl:<10} {ms:9.2f} ms  -> epruntime {speedup:.2f}x")
        if "ratio_to_single_rank" in r:
            lines.append(
                f"    vs one rank, same total tokens: {r['single_rank_ms']:.2f} ms -> {r['ratio_to_single_rank']:.2f}x"
            )
        lines += _placement_lines(r)
        if "peak_bytes" in r:
            lines.append(f"    peak memory in the layer {r['peak_bytes'] / 1e6:.2f} MB (fullest rank)")
        cpu = "  ".join(f"{s} {r['cpu_ms_all_ranks'][s]:.1f}" for s in STAGES)
        one = f" (one rank: {r['single_rank_cpu_ms']:.1f})" if "single_rank_cpu_ms" in r else ""
        lines.append(f"    host CPU ms per layer, all ranks: {cpu}{one}")
    return "\n".join(lines)


def _placement_lines(r: dict[str, Any]) -> list[str]:
    """A ``--placements`` case's load balance, and for eplb its ratio to contiguous and its check."""
    if not r["case"].get("placement"):
        return []
    b = r["expert_balance"]
    pairs = ", ".join(f"{n:,.0f}" for n in b["recv_pairs_per_rank"])
    lines = [f"    expert load: busiest rank / mean {b['max_over_mean']:.3f} (pairs per rank per call: {pairs})"]
    if "eplb" in r:
        e = r["eplb"]
        lines.append(
            f"    eplb: {e['slots']} slots ({e['redundant_experts']} redundant, {e['policy']}, placed from "
            f"{e['placed_from']}), layer time "
            f"{r['ratio_to_contiguous']:.2f}x contiguous; output differs from contiguous by "
            f"{r['max_rel_diff_to_contiguous']:.1e} (rel)"
        )
    if "verify" in r:
        v = r["verify"]
        lines.append(f"    verify: {'ok' if v['ok'] else 'FAILED'} (max rel err {v['max_rel_err']:.2e})")
    return lines


def _note(case: dict[str, Any], ratio: str | None) -> str | None:
    """The text above a case's bar: its baseline ratio, and with ``--placements`` its load balance."""
    parts = [ratio] if ratio else []
    if case["case"].get("placement"):
        parts.append(f"load {case['expert_balance']['max_over_mean']:.2f}")
        if "ratio_to_contiguous" in case:
            parts.append(f"{case['ratio_to_contiguous']:.2f}x contig.")
    return "\n".join(parts) or None


def _baselines(case: dict[str, Any]) -> tuple[dict[str, float], str | None]:
    """What a case is compared with (label -> ms per layer) and the ratio to print above its bar."""
    if "single_rank_ms" in case:
        return {"one rank, same tokens": case["single_rank_ms"]}, f"{case['ratio_to_single_rank']:.2f}x"
    peers = case.get("peers", {})
    times = {f"transformers {impl}": peers[impl]["total_ms"] for impl in ("eager", "grouped_mm") if impl in peers}
    if not times:
        return {}, None
    return times, f"{peers['speedup_vs_fastest']:.2f}x faster"


def plot_bench(report: dict[str, Any], path: str) -> str:
    """Stacked stage times per case, the total, and each case's baseline from the same run (one rank on the
    same tokens, or transformers' implementations) as a PNG; returns a line saying where it went."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install -e '.[bench]')"
    cases = report["cases"]
    labels = [c["case"]["label"] for c in cases]
    fig, ax = plt.subplots(figsize=(max(6, len(cases) * 1.1) + 2.5, 4.8))
    bottom = [0.0] * len(cases)
    for stage in STAGES[:-1]:
        values = [c["timing_ms"][stage] for c in cases]
        ax.bar(labels, values, bottom=bottom, label=stage, alpha=0.85)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    totals = [c["timing_ms"]["total"] for c in cases]
    ax.scatter(labels, totals, marker="_", s=900, linewidths=2.5, color="black", zorder=3, label="total")
    markers = iter(("v", "^", "D"))
    styles: dict[str, str] = {}
    for i, case in enumerate(cases):
        times, ratio = _baselines(case)
        for name, ms in times.items():
            first = name not in styles
            if first:
                styles[name] = next(markers)
            ax.scatter([i], [ms], marker=styles[name], s=60, color="dimgray", zorder=4, label=name if first else None)
        note = _note(case, ratio)
        if note:
            ax.annotate(note, (i, max([bottom[i], *times.values()])), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)  # fmt: skip
    ax.set_ylabel("ms per layer (medians, slowest rank)")
    if any(c["case"].get("placement") for c in cases):
        ax.set_xlabel("load = busiest rank / mean of the (token, expert) pairs received, same run")
    ranks = f"{report['world_size']} rank{'s' if report['world_size'] > 1 else ''}"
    ax.set_title(f"epruntime bench: {ranks}, {report['dtype']} (stage bars overlap in time)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.margins(y=0.12)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"plot written to {path}"
