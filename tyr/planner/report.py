"""The plan as text (what ``python -m tyr.recipes.plan`` prints)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, s in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= s:
            return f"{n / s:.2f} {unit}" if abs(n) < 10 * s else f"{n / s:.1f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: float) -> str:
    for unit, s in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= s:
            return f"{n / s:.2f} {unit}"
    return f"{int(n)}"


def fmt_flops(f: float) -> str:
    for unit, s in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if abs(f) >= s:
            return f"{f / s:.3g} {unit}"
    return f"{f:.3g} FLOP"


def fmt_time(s: float) -> str:
    for unit, d in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if s >= d:
            return f"{s / d:.3g} {unit}"
    return f"{s:.3g} s"


def _parts(d: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {fmt_bytes(v)}" for k, v in d.items() if v)


def format_plan(p: dict[str, Any]) -> str:
    a, pr, sn, tk, fl, tm, mem = p["arch"], p["params"], p["supernet"], p["tokens"], p["flops"], p["time_seconds"], p["memory"]
    st = p["settings"]
    lp, mp = pr["layer"], pr["model"]
    thr = st["throughput"]
    sv, se = st["supernet"], st["search"]
    out = [
        f"Cost plan: {p['model'] or a['model_type']} ({a['model_type']}, {a['num_layers']} layers, {p['dtype']}) "
        f"at {p['target_sparsity']:.0%} sparsity — from the config alone; GB = 1e9 bytes",
        "",
        "Parameters",
        f"  per layer: attention {fmt_count(lp['attention'])} (q {fmt_count(lp['q_proj'])}, k {fmt_count(lp['k_proj'])}, "
        f"v {fmt_count(lp['v_proj'])}, o {fmt_count(lp['o_proj'])}), "
        f"MLP {fmt_count(lp['mlp'])} (gate {fmt_count(lp['gate_proj'])}, "
        f"up {fmt_count(lp['up_proj'])}, down {fmt_count(lp['down_proj'])}), norms {fmt_count(lp['norms'])}",
        f"  prunable: {fmt_count(mp['prunable'])} ({a['num_layers']} x {fmt_count(lp['prunable'])}); kept at the budget "
        f"(grid centre, nominal): {fmt_count(pr['kept_at_budget'])} ({pr['kept_heads_centre']}/{a['num_heads']} heads, "
        f"{pr['kept_channels_centre']}/{a['intermediate_size']} channels per layer)",
        f"  whole model: {fmt_count(mp['total'])} = embeddings {fmt_count(mp['embeddings'])} + LM head "
        f"{fmt_count(mp['lm_head']) if mp['lm_head'] else '0 (tied)'} + prunable {fmt_count(mp['prunable'])} "
        f"+ norms {fmt_count(mp['norms'])}",
        "",
        f"Supernet ({sv['n_levels']} levels, interval {sv['interval']:.4g}, "
        f"min {sv['min_heads']} head / {sv['min_channels']} channels; "
        f"kept heads {sn['levels']['attn']}, kept channels {sn['levels']['mlp']})",
        f"  tyr (kept indices int32 + kept o_proj/down_proj columns, {p['dtype']}): {fmt_bytes(sn['bytes'])} "
        f"({fmt_bytes(sn['per_layer_bytes'])} per layer: attention {fmt_bytes(sn['attn_data_bytes'] / a['num_layers'])}, "
        f"MLP {fmt_bytes(sn['mlp_data_bytes'] / a['num_layers'])}; headers {fmt_bytes(sn['header_bytes'])})",
        f"  Týr's zero-padded layout, our assumption (q,k,v,o / gate,up,down at full size for every level): "
        f"{fmt_bytes(sn['tyr_layout_bytes'])} = {sn['ratio']:.2f}x tyr",
        f"    (assumption B: only o_proj / down_proj at full size for every level: "
        f"{fmt_bytes(sn['tyr_layout_out_proj_only_bytes'])})",
    ]
    if sn["tyr_reported_bytes"]:
        out.append(
            f"  Týr reported for this architecture: {fmt_bytes(sn['tyr_reported_bytes'])} "
            f"= {sn['tyr_reported_bytes'] / sn['bytes']:.2f}x tyr"
        )
    its = ", ".join(f"{i['interval']:.4g}: {fmt_bytes(i['bytes'])}" for i in sn["iterations"])
    out += [
        f"  coarse-to-fine (search={se['name']}, {len(sn['iterations'])} iterations, each centred here on the uniform "
        f"allocation): {its}; all kept: {fmt_bytes(sn['iterations_total_bytes'])}",
        f"  Týr's {len(sn['paper_intervals'])} iterations "
        f"({100 * sn['paper_intervals'][0]:.6g} -> {100 * sn['paper_intervals'][-1]:.6g} %), "
        f"all kept: {fmt_bytes(sn['paper_4_iterations_total_bytes'])}",
        "",
        f"Tokens: calibration {tk['calibration']} ({tk['calibration_sequences']} x {tk['seq_len']}), "
        f"gradient {tk['gradient']}, "
        f"search stages {tk['stages']} (candidates {fl['stage_candidates']})",
        f"Teacher top-k cache: {tk['teacher']} tokens x (k={tk['topk']}: {tk['topk']} x (4+4) + 4 + 8 bytes) = "
        f"{fmt_bytes(p['teacher_cache_bytes'])} (the pipeline caches all of data.search, {p['search_set_tokens']} tokens: "
        f"{fmt_bytes(p['teacher_cache_pipeline_bytes'])}; fresh tokens for each of the {se['generations']} generations "
        f"(the fitness rotates the teacher rows): {fmt_bytes(p['teacher_cache_fresh_bytes'])})",
        f"Disk besides the supernet: build checkpoint {fmt_bytes(p['disk']['build_checkpoint'])}, teacher file "
        f"{fmt_bytes(p['disk']['teacher_cache_file'])}",
        "",
        "Peak memory (device = working set of one accelerator; host = "
        + (
            "streamed weights: one decoder layer + embedding / head in RAM)"
            if mem["streaming"]
            else "whole model in RAM; runtime.streaming=true keeps one layer)"
        ),
    ]
    for phase, what in (
        ("gradient", f"gradient pass, {tk['gradient']} tokens"),
        ("build", f"build, {tk['calibration']} tokens"),
        ("search", f"search, last stage {tk['teacher']} tokens"),
    ):
        m = mem[phase]
        if phase == "gradient" and not tk["gradient"]:
            out.append("  gradient pass: none (the pruner needs no gradients)")
            continue
        cache = "on" if m.get("prefix_cache_on") else "off: over prefix_cache_max_mb"
        extra = "" if phase != "search" else f" (prefix cache {cache})"
        out += [
            f"  {what}: device {fmt_bytes(m['device'])}, host {fmt_bytes(m['host'])}{extra}",
            f"    device: {_parts(m['device_parts'])}",
            f"    host:   {_parts(m['host_parts'])}",
        ]
    b1 = fl["build"]
    dev_name = f"{thr['tflops']:g} TFLOP/s"
    fp64 = thr["fp64_tflops"] or thr["tflops"]
    out += [
        "",
        f"FLOPs and time (device {dev_name}, float64 solves at {fp64:g} TFLOP/s; this CPU {thr['cpu_tflops']:g} TFLOP/s)",
        f"  forward per token: dense {fmt_flops(fl['forward_per_token_dense'])} (decoder), pruned "
        f"{fmt_flops(fl['forward_per_token_pruned'])} (decoder + LM head)",
        f"  gradient pass (once): {fmt_flops(fl['gradient'])} -> {fmt_time(tm['gradient']['device'])} / "
        f"CPU {fmt_time(tm['gradient']['cpu'])}",
        f"  teacher cache (once, {p['search_set_tokens']} tokens): {fmt_flops(fl['teacher'])} -> "
        f"{fmt_time(tm['teacher']['device'])} / CPU {fmt_time(tm['teacher']['cpu'])}",
        f"  one build: 3 layer forwards {fmt_flops(b1['layer_forwards'])} + statistics {fmt_flops(b1['statistics'])} + "
        f"solves (fp64) {fmt_flops(b1['solves_fp64'])} -> {fmt_time(tm['build']['device'])} / "
        f"CPU {fmt_time(tm['build']['cpu'])}",
        f"  one search generation: {fmt_flops(fl['search_generation'])} -> {fmt_time(tm['search_generation']['device'])} / "
        f"CPU {fmt_time(tm['search_generation']['cpu'])}",
        f"  one search iteration ({se['generations']} generations): {fmt_flops(fl['search_iteration'])} -> "
        f"{fmt_time(tm['search_iteration']['device'])} / CPU {fmt_time(tm['search_iteration']['cpu'])}",
        f"  whole run (gradient + teacher + {len(sn['iterations'])} x (build + search)): {fmt_flops(fl['total'])} "
        f"(fp64 {fmt_flops(fl['total_fp64'])}) -> {fmt_time(tm['total']['device'])} / CPU {fmt_time(tm['total']['cpu'])}",
    ]
    for w in p["warnings"]:
        out.append(f"WARNING: {w}")
    return "\n".join(out)
