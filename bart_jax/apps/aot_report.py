"""What `bart-jax aot` reports of a compiled program: memory per chip against the chip's HBM,
XLA's cost analysis, the roofline estimate, and a line of text for each result."""

from __future__ import annotations

from typing import Any

from bart_jax.apps.chips import GIB, Chip


def memory_report(analysis, chip: Chip) -> dict:
    """Per-device bytes of a compiled program (`memory_analysis()`), against the chip's HBM.
    Donated arguments that become outputs (`aliased`) are counted once."""
    memory = {
        "arguments": int(analysis.argument_size_in_bytes),
        "outputs": int(analysis.output_size_in_bytes),
        "aliased": int(analysis.alias_size_in_bytes),
        "temporaries": int(analysis.temp_size_in_bytes),
        "generated_code": int(analysis.generated_code_size_in_bytes),
    }
    memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
                       + memory["generated_code"])
    memory["hbm"] = chip.hbm_bytes
    memory["fraction_of_hbm"] = round(memory["total"] / chip.hbm_bytes, 4)
    memory["fits"] = memory["total"] <= chip.hbm_bytes
    return memory


def cost_report(analysis: Any) -> dict:
    """FLOPs, bytes accessed and transcendentals per device (`cost_analysis()`)."""
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {"flops": float(analysis.get("flops", 0.0)), "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
            "transcendentals": float(analysis.get("transcendentals", 0.0))}


def roofline(cost: dict, chip: Chip, rows: int) -> dict:
    """max(FLOPs / peak, bytes / bandwidth) per device: the time if the program ran at the chip's
    peak compute or memory bandwidth, whichever binds."""
    compute = cost["flops"] / chip.peak_flops
    memory = cost["bytes_accessed"] / chip.hbm_bandwidth
    seconds = max(compute, memory)
    return {"seconds": seconds, "compute_seconds": compute, "memory_seconds": memory,
            "bound": "compute" if compute >= memory else "memory",
            "rows_per_second": rows / seconds if seconds else None}


def text_line(record: dict) -> str:
    """One readable line per workload."""
    head = f"{record['workload']} {record['preset']} {record['dtype']} batch {record['batch_size']}"
    if record["platform"] == "cuda":
        if not record["lowered"]:
            return f"{head} (cuda): does not lower: {record['error']}"
        calls = ", ".join(f"{name} x{count}" for name, count in record["custom_calls"].items()) or "none"
        return f"{head} (cuda): lowers in {record['lower_seconds']} s; custom calls: {calls}"
    mesh = ",".join(f"{axis}={size}" for axis, size in record["mesh"].items() if size > 1) or "one device"
    head = f"{head} on {record['topology']} ({mesh})"
    if "max_per_chip_batch" in record:
        head += f": largest per-chip batch {record['max_per_chip_batch']}"
    if not record["compiled"]:
        return f"{head}: does not compile: {record['error']}"
    memory, cost, estimate = record["memory"], record["cost"], record["roofline"]
    return (f"{head}: compiled in {record['compile_seconds']} s; per chip {memory['total'] / GIB:.2f} GiB of "
            f"{memory['hbm'] / GIB:.2f} GiB HBM ({memory['arguments'] / GIB:.2f} arguments, "
            f"{memory['temporaries'] / GIB:.2f} temporaries){'' if memory['fits'] else ' - does not fit'}; "
            f"{cost['flops'] / 1e12:.2f} TFLOP, {cost['bytes_accessed'] / 1e9:.2f} GB accessed; roofline "
            f"{estimate['seconds'] * 1e3:.1f} ms ({estimate['bound']}-bound, estimate)")
