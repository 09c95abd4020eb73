"""The issue's targets against the suite's figures, and the Markdown report."""

from __future__ import annotations

MIB = 1 << 20


def _worst_step_ratio(step: dict) -> tuple[float | None, str]:
    """The mixed step over the base step, worst over the row counts that mix 8 adapters (>= 16 rows):
    graph replay against graph replay where both were captured, else the served kernel eagerly."""
    worst, where = None, ""
    rows = step.get("rows", {})
    mixed_rows = [n for n in rows if int(n) >= 16] or list(rows)
    for n in mixed_rows:
        r = rows[n]
        if "mixed_graph_ms" in r and "base_graph_ms" in r:
            ratio, how = r["mixed_graph_ms"] / r["base_graph_ms"], "graph replay"
        elif r.get("mixed_served_ms") is not None:
            ratio, how = r["mixed_served_ms"] / r["base_ms"], f"eager, {step['served_kernel']} kernel"
        else:
            continue
        if worst is None or ratio > worst:
            worst, where = ratio, f"{n} rows, {how}"
    return worst, where


def targets(result: dict) -> list[dict]:
    """The four targets of #19 with the measured value and PASS / MISS (None: not measured, with why)."""
    parts = result["parts"]
    out = []

    def add(name: str, value, limit: float, higher_is_better: bool, unit: str, note: str) -> None:
        ok = None if value is None else (value >= limit if higher_is_better else value <= limit)
        out.append({"target": name, "measured": value, "unit": unit, "pass": ok, "note": note})

    engine = parts.get("b_engine", {})
    levels = engine.get("levels", [])
    best = max(levels, key=lambda lv: lv["images_per_s"], default=None)
    add(
        ">= 8 img/s at saturation, 8 mixed adapters",
        None if best is None else best["images_per_s"],
        8.0,
        True,
        "img/s",
        "engine not run" if best is None else f"best closed loop: {best['concurrency']} in flight",
    )
    ratio, where = _worst_step_ratio(parts.get("a_step", {}))
    add("mixed step <= 1.10x base step", ratio, 1.10, False, "x", where or "step not run")
    one = next((lv for lv in levels if lv["concurrency"] == 1), None)
    add(
        "p50 <= 0.40 s at one request in flight",
        None if one is None else one["p50_s"],
        0.40,
        False,
        "s",
        "engine not run" if one is None else f"{one['images']} requests, one at a time",
    )
    resident = engine.get("residency", {})
    add(
        "adapter resident from host memory <= 5 ms",
        resident.get("median_ms"),
        5.0,
        False,
        "ms",
        resident.get("error")
        or f"median of {resident.get('adapters', 0)} rank-16 adapters from {resident.get('host_memory', 'host')} "
        "memory, want -> ready, synchronised"
        + (
            f"; pageable: {resident['pageable']['median_ms']:.2f} ms"
            if "median_ms" in resident.get("pageable", {})
            else ""
        )
        + (f"; {resident['note']}: {resident['host_weights_error']}" if "note" in resident else ""),
    )
    return out


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 10**-digits or v == 0 else f"{v:.2e}"
    return str(v)


def markdown(result: dict) -> str:
    """The report: the machine, targets with PASS/MISS, then one table per part."""
    s, m = result["settings"], result["machine"]
    lines = [
        "# lorafleet GPU suite (#19)" + (" — CPU smoke: timings mean nothing" if s["smoke"] else ""),
        "",
        f"Machine: {m['device_name']}; torch {m['torch']}, diffusers {m.get('diffusers')}, peft {m.get('peft')}; "
        f"{s['dtype']}. Suite wall time {result['wall_s']:.1f} s. {result['graph_support']}.",
        "",
        "| target | measured | verdict | how |",
        "|---|---:|---|---|",
    ]
    for t in result["targets"]:
        verdict = "NOT MEASURED" if t["pass"] is None else ("PASS" if t["pass"] else "MISS")
        lines.append(f"| {t['target']} | {_fmt(t['measured'])} {t['unit']} | {verdict} | {t['note']} |")
    parts = result["parts"]
    lines += _step_table("(a) UNet step alone, " + s["sd"]["source"], parts.get("a_step", {}))
    engine = parts.get("b_engine", {})
    lines += _engine_table(f"(b) engine end to end, {s['sd']['source']}", engine)
    diff = parts.get("c_diffusers", {})
    lines += ["", "## (c) diffusers, same model and run", ""]
    if "error" in diff or "skipped" in diff:
        lines.append(diff.get("error") or diff["skipped"])
    else:
        lines += ["| system | images/s | images |", "|---|---:|---:|"]
        for label, d in diff.items():
            lines.append(f"| {label} | {_fmt(d['images_per_s'])} | {d['images']} |")
    sdxl = parts.get("d_sdxl", {})
    lines += ["", f"## (d) SDXL, {s['sdxl']['source']}, {s['sdxl']['size_px']} px", ""]
    if "error" in sdxl or "skipped" in sdxl:
        lines.append(sdxl.get("error") or sdxl["skipped"])
    else:
        lines += _step_table("step", sdxl.get("step", {}), level="###")
        lines += _engine_table("engine end to end", sdxl.get("engine", {}), level="###")
    lines += ["", "## (e) memory", "", "| what | MiB |", "|---|---:|"]
    for key, v in parts.get("e_memory", {}).items():
        if isinstance(v, int | float):
            lines.append(f"| {key} | {v / MIB:.1f} |")
        else:
            lines.append(f"| {key} | {v} |")
    lines += ["", "## (f) correctness", ""]
    for key, v in parts.get("f_correctness", {}).items():
        lines.append(f"- {key}: {_correctness(v)}")
    lines += _ip_adapter_lines(parts.get("h_ip_adapter", {}), s["sd"]["source"])
    g = parts.get("g_compile", {})
    lines += ["", f"## (g) regional compile (model.compile: regional), {s['sd']['source']}", ""]
    if "compile_s" not in g:
        lines.append(str(g.get("error") or g.get("skipped") or "not run"))
    else:
        lines.append(
            f"{g['rows']} rows, mixed adapters, backend {g['backend']}: compile {g['compile_s']:.1f} s "
            f"({g.get('compiled_graphs')} graphs); step eager {_fmt(g['eager_ms'])} ms, compiled "
            f"{_fmt(g.get('compiled_ms'))} ms ({_fmt(g.get('compiled_vs_eager_speed'))}x); another adapter mix "
            f"recompiled: {g.get('recompiled_on_new_adapters')}"
            + (f" ({g['recompile_error']})" if "recompile_error" in g else "")
            + (
                f"; compiled vs eager on it: max |diff| {g['compiled_vs_eager_max_abs']:.3g}"
                if "compiled_vs_eager_max_abs" in g
                else ""
            )
        )
    return "\n".join(lines) + "\n"


def _ip_adapter_lines(h: dict, source: str) -> list[str]:
    """(h): the tick with 0-16 image rows of 16 against IP-Adapter off, and the image encoder's images/s."""
    lines = ["", f"## (h) IP-Adapter (#22), {source}", ""]
    if "mixed" not in h:
        return [*lines, str(h.get("error") or h.get("skipped") or "not run")]
    m = h["mixed"]
    lines += [
        f"One eager tick, {m['rows']} rows at {m['size_px']} px, {m['ip_layers']} IP layers x {m['ip_tokens']} "
        f"tokens; rows without an image equal IP-Adapter off: {m['plain_rows_identical']}; image rows moved: "
        f"{m['image_rows_moved']}.",
        "",
        "| image rows | tick ms | vs 0 image rows |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {t['image_rows']} | {_fmt(t['tick_ms'])} | {_fmt(t['vs_0_image_rows'], 3)}x |" for t in m["ticks"]]
    e = h.get("encoder", {})
    if "results" in e:
        lines += [
            "",
            f"Image encoder {e['encoder']} ({e['parameters'] / 1e6:.1f}M parameters), 256 px images:",
            "",
            "| row by row | batch | miss images/s | hit images/s |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['rowwise']} | {r['batch']} | {_fmt(r['miss_images_per_s'])} | {_fmt(r['hit_images_per_s'], 0)} |"
            for r in e["results"]
        ]
    return lines


def _correctness(v) -> str:
    """One line per check: its figure, or why it has none."""
    if not isinstance(v, dict):
        return str(v)
    if "error" in v or "skipped" in v:
        return v.get("error") or f"skipped: {v['skipped']}"
    if "min_psnr_db" in v:
        return (
            f"served vs diffusers, {len(v['images'])} images with adapters: PSNR >= {v['min_psnr_db']:.1f} dB "
            f"(against diffusers without the adapter: <= {v['max_psnr_vs_no_adapter_db']:.1f} dB)"
        )
    if "latents_max_abs" in v:
        return f"max |latents| difference {v['latents_max_abs']:.3g} over {v.get('images', '?')} images"
    return str(v)


def _step_table(title: str, step: dict, level: str = "##") -> list[str]:
    lines = ["", f"{level} {title}", ""]
    if "error" in step or "skipped" in step or not step:
        return [*lines, step.get("error") or step.get("skipped", "not run")]
    lines += [
        f"{step['lora_layers']} LoRA layers (the server's slot targets), served kernel {step['served_kernel']}; "
        f"graphs: {step['graph'] or 'captured'}.",
        "",
        "| rows | base ms | mixed grouped ms | mixed gather ms | base graph ms | mixed graph ms | served / base |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rows, r in step["rows"].items():
        served = r.get("mixed_served_ms")
        ratio = None if served is None else served / r["base_ms"]
        lines.append(
            f"| {rows} | {_fmt(r['base_ms'])} | {_fmt(r['mixed_grouped_ms'])} | {_fmt(r['mixed_gather_ms'])} | "
            f"{_fmt(r.get('base_graph_ms'))} | {_fmt(r.get('mixed_graph_ms'))} | {_fmt(ratio)}x |"
        )
        if "graph_error" in r:
            lines.append(f"| {rows} | graph capture failed: {r['graph_error']} | | | | | |")
    return lines


def _engine_table(title: str, engine: dict, level: str = "##") -> list[str]:
    lines = ["", f"{level} {title}", ""]
    if "error" in engine or "skipped" in engine or not engine:
        return [*lines, engine.get("error") or engine.get("skipped", "not run")]
    lines += [
        "| in flight | images | images/s | p50 s | p95 s | mean tick ms | rows/tick |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in engine.get("levels", []):
        lines.append(
            f"| {lv['concurrency']} | {lv['images']} | {_fmt(lv['images_per_s'])} | {_fmt(lv['p50_s'], 3)} | "
            f"{_fmt(lv['p95_s'], 3)} | {_fmt(lv['mean_tick_ms'])} | {_fmt(lv['mean_rows_per_tick'], 1)} |"
        )
    return lines
