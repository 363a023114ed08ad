"""The whole plan: parameters, supernet bytes, memory per phase, FLOPs and time, as one dict."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from tyr.planner.flops import (
    BUILD_LAYER_FORWARDS,
    GRAD_FORWARD_EQUIVALENTS,
    forward_flops_per_token,
    solve_flops,
    stage_candidates,
)
from tyr.planner.settings import ArchFacts, DataSizes, GridSettings, PrunerSettings, Throughput
from tyr.planner.sizes import TYR_REPORTED_BYTES, dtype_bytes, supernet_bytes, teacher_cache_bytes, tyr_paper_layout_bytes
from tyr.search.settings import SearchSettings
from tyr.supernet.grid import KINDS, SupernetGrid, make_grid

KL_CHUNK = 1024  # positions per LM-head chunk in tyr.fitness.kl_sum / TeacherCache.build


def _grid(arch: ArchFacts, target: float, interval: float, n_levels: int, min_heads: int, min_channels: int) -> SupernetGrid:
    return make_grid(arch.layer_shapes(), target, interval, n_levels, min_heads, min_channels)


def _levels_summary(grid: SupernetGrid) -> dict[str, list[int]]:
    return {k: list(grid.modules[k][0].keep) for k in KINDS}


def plan(
    arch: ArchFacts,
    dtype: str,
    target_sparsity: float,
    supernet: GridSettings = GridSettings(),
    data: DataSizes = DataSizes(131072, 32768, 4096),
    search: SearchSettings | None = None,
    pruner: PrunerSettings = PrunerSettings(),
    throughput: Throughput = Throughput(),
    model_name: str = "",
    streaming: bool = False,
) -> dict[str, Any]:
    """The whole plan as a JSON-serialisable dict (see :func:`format_plan`). With ``streaming``
    (``runtime.streaming=true``), host memory holds one decoder layer plus the embedding, final norm
    and LM head instead of the whole model, and the search keeps no dense copies of the layers.
    ``search`` defaults to Týr's settings."""
    search = SearchSettings() if search is None else search
    b = dtype_bytes(dtype)
    act = b  # hidden states are kept in the model dtype (embedding output and every layer output)
    L, H, I, V, T = arch.num_layers, arch.hidden_size, arch.intermediate_size, arch.vocab_size, data.seq_len
    lp, mp = arch.layer_params(), arch.model_params()
    fp64 = throughput.fp64_tflops or throughput.tflops

    # --- supernet: one build with conf/supernet, and every coarse-to-fine iteration ----------------
    grid = _grid(arch, target_sparsity, supernet.interval, supernet.n_levels, supernet.min_heads, supernet.min_channels)
    sn = supernet_bytes(grid, arch, dtype, pruner.bias)
    tyr_layout = tyr_paper_layout_bytes(grid, arch, dtype)
    reported = TYR_REPORTED_BYTES.get((L, H, I, arch.num_heads))
    centre = grid.centre_levels()
    kept = grid.allocation_params(centre)
    kept_heads = [g.keep[g.centre] for g in grid.modules["attn"]]

    def iteration_grids(intervals, n_levels, min_heads, min_channels):
        return [_grid(arch, target_sparsity, iv, n_levels, min_heads, min_channels) for iv in intervals]

    it_grids = iteration_grids(search.intervals, search.n_levels, search.min_heads, search.min_channels)
    iterations = [
        {
            "interval": iv,
            "levels": _levels_summary(g),
            "bytes": supernet_bytes(g, arch, dtype, pruner.bias)["total"],
            "tyr_layout_bytes": tyr_paper_layout_bytes(g, arch, dtype)["all_projections"],
        }
        for iv, g in zip(search.intervals, it_grids)
    ]
    paper = SearchSettings()  # Týr's settings, for the comparison line
    paper_grids = iteration_grids(paper.intervals, paper.n_levels, paper.min_heads, paper.min_channels)
    paper_total = sum(supernet_bytes(g, arch, dtype, pruner.bias)["total"] for g in paper_grids)

    # --- token counts ------------------------------------------------------------------------------
    n_cal, n_grad = data.sequences(data.calib_tokens), data.sequences(data.grad_tokens)
    C, G = n_cal * T, n_grad * T
    stage_seqs = [data.sequences(t) for t, _ in search.stages]
    n_teacher = max(stage_seqs)
    k = min(search.topk, V)
    teacher = teacher_cache_bytes(n_teacher, T, k)
    n_search_set = data.sequences(data.search_set_tokens) if data.search_set_tokens else n_teacher
    teacher_pipeline = teacher_cache_bytes(n_search_set, T, k)  # the pipeline caches all of data.search
    # KLFitness rotates the teacher rows per generation: fresh tokens every generation need this many
    teacher_fresh = teacher_cache_bytes(n_teacher * search.generations, T, k)
    S = n_teacher * T  # tokens of the largest (last) stage
    warnings = []
    if data.search_set_tokens is not None and data.search_set_tokens < S:
        warnings.append(
            f"data.search holds {data.search_set_tokens} tokens but the last stage wants {S}: the "
            f"pipeline's teacher cache covers data.search only, so larger stages are capped at "
            f"{data.search_set_tokens} tokens (raise data.search.num_sequences)"
        )

    # --- memory: gradient pass ---------------------------------------------------------------------
    w_layer = lp["total"] * b
    # resident weights on the host: the whole model, or (streamed) one layer + embedding / norm / head
    w_model = (w_layer + (mp["total"] - L * lp["total"]) * b) if streaming else mp["total"] * b
    largest_proj = max(lp[name] for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    seq_autograd = T * (4 * H + 3 * arch.q_dim + 2 * arch.kv_dim + 4 * I) * act  # saved activations, one sequence
    grad_dev = {
        "layer_weights": w_layer,
        "weight_grads": lp["prunable"] * b,
        "fisher_accumulators_fp32": 2 * lp["prunable"] * 4,
        "taylor_temporaries_fp32": 4 * largest_proj * 4,
        "one_sequence_activations": seq_autograd,
        "loss_logits_fp32": 3 * T * V * 4 + T * V * b,
        "lm_head_and_norm": (V * H + H) * b,
    }
    grad_host = {
        "model_weights": w_model,
        "layer_input_checkpoints": (L + 2) * G * H * act,
        **{k_: v for k_, v in grad_dev.items() if k_ not in ("layer_weights", "lm_head_and_norm")},
    }
    if not G:  # the pruner needs no gradients: no gradient pass
        grad_dev, grad_host = {}, {}

    # --- memory: build -----------------------------------------------------------------------------
    def f32_copies(params: int) -> int:
        return 0 if dtype == "float32" else params * 4  # ModuleProblem's .float() copies the weights

    width = {"attn": arch.head_dim, "mlp": 1}

    def workspace(g_, kind):
        d = g_.n_units * width[kind]
        inner = [k_ * width[kind] for k_ in g_.keep if k_ < g_.n_units] or [0]
        kk = max(inner) + (1 if pruner.bias else 0)
        # refit(): augmented H and W₀ in float64 for the whole call; on top, at its worst statement,
        # the row gather H[K] plus the kept block and its copy, or the block, its Cholesky factor,
        # the right-hand side and the solution. relative_error(): H, W₀, Δ, [Δ b] and Δ·H.
        refit_peak = (d + 1) ** 2 + H * d + max(kk * (d + 1) + 2 * kk * kk, 2 * kk * kk + 2 * kk * H)
        err_peak = (d + 1) ** 2 + 2 * H * d + 2 * H * (d + 1)
        return 8 * max(refit_peak, err_peak)

    def build_memory(g):
        variants = sum(H * k_ * width[kind] * 4 for kind in KINDS for k_ in g.modules[kind][0].keep)
        eea = 0 if supernet.eea == "none" else (H * arch.q_dim + H * I) * (4 + b)
        dev = {
            "layer_weights": w_layer,
            "batch_activations": data.batch_size * T * (2 * H + 2 * arch.q_dim + 2 * arch.kv_dim + 3 * I) * act,
            "statistics_fp32": 4 * (arch.q_dim**2 + arch.q_dim + I * I + I),
            "module_problems_fp32": f32_copies(3 * H * arch.q_dim) + f32_copies(4 * H * I),
            "variants_fp32": variants,
            "eea_expected_weights": eea,
            "solve_workspace_fp64": max(workspace(g.modules["attn"][0], "attn"), workspace(g.modules["mlp"][0], "mlp")),
        }
        host = {
            "model_weights": w_model,
            "calibration_activations_x3": 3 * C * H * act,
            "shard_serialisation": 2 * max(supernet_bytes(g, arch, dtype, pruner.bias)["per_layer"]),
            **{k_: v for k_, v in dev.items() if k_ != "layer_weights"},
        }
        return dev, host

    build_dev, build_host = build_memory(grid)

    # --- memory: search ----------------------------------------------------------------------------
    stage_act = S * H * act
    prefix_on = search.prefix_cache and L * stage_act <= search.prefix_cache_max_mb * 2**20
    pruned_weights = (kept + L * lp["norms"] + H + mp["embeddings"] + mp["lm_head"]) * b
    search_dev = {
        # streamed: the candidate's layers pass through one at a time (plus embedding / norm / head)
        "pruned_model": w_model if streaming else pruned_weights,
        "teacher_topk_cache": teacher,
        "prefix_cache": L * stage_act if prefix_on else 0,
        "stage_activations_x3": 3 * stage_act,
        "kl_chunk": KL_CHUNK * V * (3 * 4 + b),
        "batch_activations": data.batch_size * T * (2 * H + 2 * arch.q_dim + 2 * arch.kv_dim + 3 * I) * act,
    }
    search_host = {
        "model_weights": w_model,
        "assembler_dense_layers": 0 if streaming else L * w_layer,
        "supernet_shard_cache": max(sn["per_layer"]),
        **{k_: v for k_, v in search_dev.items() if k_ != "pruned_model"},
        "teacher_topk_cache": teacher_pipeline,
    }

    # --- FLOPs -------------------------------------------------------------------------------------
    dense_lin = L * lp["prunable"]
    dense_q = [arch.q_dim] * L
    fwd_dense = forward_flops_per_token(arch, dense_lin, dense_q, T, with_head=False)
    # LM head: forward + gradient w.r.t. its input (its weight needs no gradient); g and g² summed per sequence
    grad_flops = G * (GRAD_FORWARD_EQUIVALENTS * fwd_dense + 4 * V * H) + 3 * mp["prunable"] * n_grad if G else 0.0
    # the pipeline runs the dense model over all of data.search to fill its teacher cache
    teacher_flops = n_search_set * T * forward_flops_per_token(arch, dense_lin, dense_q, T, with_head=True)

    def build_flops(g):
        fwd = BUILD_LAYER_FORWARDS * C * fwd_dense
        stats = L * 2.0 * C * (arch.q_dim**2 + I**2)
        solves = solve_flops(g, arch, pruner)
        return {
            "layer_forwards": fwd,
            "statistics": stats,
            "solves_fp64": solves["total"],
            "solves_detail": solves,
            "seconds": (fwd + stats) / (throughput.tflops * 1e12) + solves["total"] / (fp64 * 1e12),
            "cpu_seconds": (fwd + stats + solves["total"]) / (throughput.cpu_tflops * 1e12),
        }

    pruned_q = [h * arch.head_dim for h in kept_heads]
    fwd_pruned = forward_flops_per_token(arch, kept, pruned_q, T, with_head=True)
    cands = stage_candidates(search)
    stage_tokens = [min(s, n_teacher) * T for s in stage_seqs]
    gen_flops = sum(c * t for c, t in zip(cands, stage_tokens)) * fwd_pruned
    surrogate = (search.surrogate_check + 1) * stage_tokens[0] * fwd_pruned if search.surrogate_check else 0.0
    search_iter = search.generations * gen_flops + surrogate
    builds = [build_flops(g) for g in it_grids]
    build_one = build_flops(grid)
    main_total = (
        grad_flops + teacher_flops + sum(bf["layer_forwards"] + bf["statistics"] for bf in builds) + len(it_grids) * search_iter
    )
    fp64_total = sum(bf["solves_fp64"] for bf in builds)

    def secs(f, f64=0.0):
        return {"device": f / (throughput.tflops * 1e12) + f64 / (fp64 * 1e12), "cpu": (f + f64) / (throughput.cpu_tflops * 1e12)}

    return {
        "model": model_name,
        "arch": asdict(arch),
        "dtype": dtype,
        "target_sparsity": target_sparsity,
        "settings": {
            "supernet": asdict(supernet),
            "data": asdict(data),
            "search": asdict(search),
            "pruner": asdict(pruner),
            "throughput": asdict(throughput),
        },
        "params": {
            "layer": lp,
            "model": mp,
            "kept_at_budget": kept,
            "kept_heads_centre": kept_heads[0],
            "kept_channels_centre": grid.modules["mlp"][0].keep[grid.modules["mlp"][0].centre],
        },
        "supernet": {
            "levels": _levels_summary(grid),
            "bytes": sn["total"],
            "data_bytes": sn["data"],
            "header_bytes": sn["header"],
            "per_layer_bytes": sn["per_layer"][0],
            "attn_data_bytes": sn["attn_data"],
            "mlp_data_bytes": sn["mlp_data"],
            "tyr_layout_bytes": tyr_layout["all_projections"],
            "tyr_layout_out_proj_only_bytes": tyr_layout["output_projection_only"],
            "ratio": tyr_layout["all_projections"] / sn["total"],
            "tyr_reported_bytes": reported,
            "iterations": iterations,
            "iterations_total_bytes": sum(i["bytes"] for i in iterations),
            "paper_4_iterations_total_bytes": paper_total,
            "paper_intervals": list(paper.intervals),
        },
        "tokens": {
            "calibration": C,
            "calibration_sequences": n_cal,
            "gradient": G,
            "gradient_sequences": n_grad,
            "seq_len": T,
            "stages": stage_tokens,
            "teacher": S,
            "teacher_sequences": n_teacher,
            "topk": k,
        },
        "teacher_cache_bytes": teacher,
        "teacher_cache_pipeline_bytes": teacher_pipeline,
        "teacher_cache_fresh_bytes": teacher_fresh,
        "search_set_tokens": n_search_set * T,
        "disk": {
            "supernet_all_iterations": sum(i["bytes"] for i in iterations),
            "build_checkpoint": C * H * act,
            "teacher_cache_file": teacher_pipeline - n_search_set * T * 4,
        },  # ids saved as int32
        "memory": {
            "streaming": streaming,
            "gradient": {
                "device": sum(grad_dev.values()),
                "host": sum(grad_host.values()),
                "device_parts": grad_dev,
                "host_parts": grad_host,
            },
            "build": {
                "device": sum(build_dev.values()),
                "host": sum(build_host.values()),
                "device_parts": build_dev,
                "host_parts": build_host,
            },
            "search": {
                "device": sum(search_dev.values()),
                "host": sum(search_host.values()),
                "device_parts": search_dev,
                "host_parts": search_host,
                "prefix_cache_on": prefix_on,
            },
        },
        "flops": {
            "gradient": grad_flops,
            "teacher": teacher_flops,
            "build": build_one,
            "build_per_iteration": [{k_: v for k_, v in bf.items() if k_ != "solves_detail"} for bf in builds],
            "forward_per_token_dense": fwd_dense,
            "forward_per_token_pruned": fwd_pruned,
            "search_generation": gen_flops,
            "stage_candidates": cands,
            "search_iteration": search_iter,
            "total": main_total + fp64_total,
            "total_fp64": fp64_total,
        },
        "time_seconds": {
            "gradient": secs(grad_flops),
            "teacher": secs(teacher_flops),
            "build": {"device": build_one["seconds"], "cpu": build_one["cpu_seconds"]},
            "search_generation": secs(gen_flops),
            "search_iteration": secs(search_iter),
            "total": secs(main_total, fp64_total),
        },
        "warnings": warnings,
    }
