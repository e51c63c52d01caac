"""Where one decode step's time goes: onnxruntime's kernels, attention over the KV cache, and Python glue.

    python tools/step_profile.py -m ARTIFACT [--depth 2048 [--fill]] [--kv tq3.5] [--steps 32] [--ops] [--floor]

The step is timed whole (median of --steps decode steps after the depth is prefilled with random tokens, or with
--fill, one prefilled chunk repeated to the depth by Model.fill_cache, as `bench --fill` does), then
once more under cProfile, whose tallies split it into: time inside onnxruntime's `run` (the graphs' kernels and
onnxruntime's own per-call overhead), time inside attention (everything below the attention module's entry
points, kernels included), and the rest (the engine's numpy and Python between them: embedding and PLE rows,
masks, cache writes, argument shuffling). cProfile's own cost lands mostly in the glue share, so the shares are
scaled to the uninstrumented median. --ops adds onnxruntime's profiler: kernel time by operator type, summed over
the graphs of a step. --floor times what onnxruntime's weight kernels take alone: each graph's linear nodes
(MatMulNBits, MatMulInt4, MatMulInt8, MatMul on a weight) rebuilt into a graph of their own, on the artifact's own
weights, fed random activations, and nothing else, run as the step runs its graphs; with bench's bandwidth probe, it
gives the fraction of bench's ceiling that onnxruntime's kernels allow this artifact on this machine, against the
fraction the whole step reaches (the difference is what the runtime's own nodes, attention and glue cost).
The tool starts itself again with weights in huge pages, as the CLI does (edge_runtime/huge_pages.py), so that its
step is bench's.
Speed figures depend on the machine: the output names the CPU; compare runs side by side in one sitting.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import edge_runtime  # before numpy: it keeps OpenBLAS to one thread (edge_runtime/__init__.py), as the CLI does

# isort: split
import numpy as np

ATTENTION_MODULES = ("edge_runtime/attention", "edge_runtime/quant/", "edge_runtime/kernels/")
ORT_RUN = "onnxruntime_pybind11_state.run"  # the binding's InferenceSession.run, as cProfile names it


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def prefill(model, depth: int, seed: int = 0) -> None:
    """Fill the cache with `depth` random tokens (as `bench -d` does), in prefill chunks."""
    rng = np.random.default_rng(seed)
    model.reset()
    ids = rng.integers(4, model.spec.input_vocab_size, size=depth)
    model.feed(ids)


def decode_steps(model, steps: int) -> list[float]:
    times = []
    for token in np.random.default_rng(1).integers(4, model.spec.input_vocab_size, size=steps):
        start = time.perf_counter()
        model.feed([token])
        times.append(time.perf_counter() - start)
    return times


def split(stats: pstats.Stats) -> dict[str, float]:
    """Seconds inside onnxruntime's run, inside attention (cumulative, from its outermost frames), and the rest."""
    raw = stats.stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    total = sum(tt for _, _, tt, _, _ in raw.values())
    ort = sum(tt for (file, _, name), (_, _, tt, _, _) in raw.items() if ORT_RUN in name)

    def in_attention(key) -> bool:
        return any(m in key[0] for m in ATTENTION_MODULES)

    attention = sum(ct for key, (_, _, _, ct, callers) in raw.items()
                    if in_attention(key) and not any(in_attention(c) for c in callers))
    return {"onnxruntime": ort, "attention": attention, "glue": total - ort - attention, "total": total}


def _sessions(engine) -> list:
    """Every onnxruntime session the engine holds, however it arranges them (this tool also profiles older
    versions of the engine, for before/after comparisons)."""
    import onnxruntime as ort

    found = []

    def collect(value) -> None:
        if isinstance(value, ort.InferenceSession):
            if not any(value is seen for seen in found):  # held twice (a list and the step plan): profiled once
                found.append(value)
        elif isinstance(value, list | tuple):
            for item in value:
                collect(item)

    for value in vars(engine).values():
        collect(value)
    return found


def ort_ops(model, steps: int, out_dir: Path) -> dict[str, float]:
    """Microseconds per step by operator type, from onnxruntime's profiler on fresh sessions of the same graphs."""
    from edge_runtime import engine as engine_module

    make_options = engine_module._session_options

    def profiled(threads):
        options = make_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(out_dir / "ort")
        return options

    engine_module._session_options = profiled
    try:
        import edge_runtime

        profiled_model = edge_runtime.load(model.path, threads=model.engine.attention_workers,
                                           kv=model.kv_format.name, context_length=model.context_length)
        prefill(profiled_model, 8)
        decode_steps(profiled_model, steps)
        files = [Path(s.end_profiling()) for s in _sessions(profiled_model.engine)]
    finally:
        engine_module._session_options = make_options
    by_op: dict[str, float] = defaultdict(float)
    for file in files:
        events = json.loads(file.read_text())
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                by_op[event["args"]["op_name"]] += event["dur"]
    return {op: us / (steps + 1) for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])}


# Nodes that read a weight: the weight is their second input, an initializer of the graph (weight_formats' emit).
WEIGHT_OPS = ("MatMulNBits", "MatMul", "Gemm", "MatMulInt4", "MatMulInt8")


def _input_width(node, weight) -> int:
    """K of a weight node: MatMulNBits says it, MatMulInt4's codes are [N / 16, K / 8, 64] (K to the whole block),
    MatMulInt8's [N / 16, K / 4, 64] (K to a multiple of 16); the others' weights are [K, N], or [N, K] under Gemm's
    transB."""
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "MatMulNBits":
        return attrs["K"].i
    if node.op_type in ("MatMulInt4", "MatMulInt8"):
        return weight.dims[1] * (8 if node.op_type == "MatMulInt4" else 4)
    transposed = node.op_type == "Gemm" and "transB" in attrs and attrs["transB"].i == 1
    return weight.dims[-1] if transposed else weight.dims[-2]


def weight_graph(source: Path) -> tuple[bytes, dict[str, tuple[int, np.dtype]]] | None:
    """`source`'s weight nodes alone, each fed a graph input of its own, on the same initializers (pointing into the
    artifact's weights file, as its graphs' do): the serialized graph and each input's (width, dtype); None for a
    graph that reads no weight."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(source, load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    nodes, kept, inputs = [], {}, {}
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        weight = initializers[node.input[1]]
        half = node.op_type in ("MatMul", "Gemm") and weight.data_type == TensorProto.FLOAT16
        x = f"x{len(nodes)}"
        inputs[x] = (_input_width(node, weight), np.dtype(np.float16 if half else np.float32))
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[0] = x
        del copy.output[1:]
        copy.output[0] = f"y{len(nodes)}"
        nodes.append(copy)
        kept.update((name, initializers[name]) for name in node.input[1:] if name in initializers)
    if not nodes:
        return None
    graph = helper.make_graph(
        nodes, "weights", [helper.make_tensor_value_info(x, helper.np_dtype_to_tensor_dtype(dtype), [1, width])
                           for x, (width, dtype) in inputs.items()],
        [helper.make_tensor_value_info(n.output[0], helper.np_dtype_to_tensor_dtype(dtype), None)
         for n, (_, dtype) in zip(nodes, inputs.values())], list(kept.values()))
    made = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return made.SerializeToString(), inputs


def weight_session(graph: bytes, artifact: Path, threads: int):
    """An onnxruntime session of a weight graph with the engine's options, its initializers read from `artifact`'s
    weights file (a folder of links to it is refused by onnxruntime's external-data path check)."""
    import onnx
    import onnxruntime as ort

    from edge_runtime import onnxruntime_ops
    from edge_runtime.engine import _session_options

    options = _session_options(threads)
    if any(node.domain == onnxruntime_ops.DOMAIN for node in onnx.load_from_string(graph).graph.node):
        onnxruntime_ops.register(options, artifact, "weight nodes are", "profile an artifact without them")
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(artifact))
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def floor_steps(model, steps: int) -> list[float]:
    """Seconds of each of `steps` runs of the artifact's weight graphs (weight_graph), one after another as a decode
    step runs its graphs, on sessions with the engine's options."""
    from edge_runtime.families.contract import SEGMENT_GRAPH

    rng = np.random.default_rng(2)
    runs = []
    for source in sorted(p for p in Path(model.path).iterdir() if SEGMENT_GRAPH.fullmatch(p.name)):
        made = weight_graph(source)
        if made is not None:
            graph, inputs = made
            feeds = {x: rng.standard_normal((1, width)).astype(dtype) for x, (width, dtype) in inputs.items()}
            runs.append((weight_session(graph, Path(model.path), model.threads), feeds))
    times = []
    for _ in range(steps + 2):  # the first two: onnxruntime's first-run set-up
        start = time.perf_counter()
        for session, feeds in runs:
            session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return times[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", type=Path, required=True)
    parser.add_argument("-d", "--depth", type=int, default=0)
    parser.add_argument("--kv", default="fp16")
    parser.add_argument("-t", "--threads", type=int, default=None)
    parser.add_argument("--fill", action="store_true", help="one prefilled chunk repeated to the depth (bench --fill)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--ops", action="store_true", help="also time onnxruntime's kernels by operator type")
    parser.add_argument("--floor", action="store_true",
                        help="also time the weight kernels alone and read bench's bandwidth ceiling")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from edge_runtime import huge_pages

    huge_pages.relaunch()

    model = edge_runtime.load(args.model, threads=args.threads, kv=args.kv,
                              context_length=args.depth + args.steps + 16)
    if args.fill and args.depth:
        model.fill_cache(args.depth, np.random.default_rng(0))
    else:
        prefill(model, max(args.depth, 1))
    decode_steps(model, 4)
    median = statistics.median(decode_steps(model, args.steps))
    profile = cProfile.Profile()
    profile.enable()
    decode_steps(model, args.steps)
    profile.disable()
    shares = split(pstats.Stats(profile))
    scale = median / (shares["total"] / args.steps)
    result = {"cpu": cpu_name(), "model": str(args.model), "depth": args.depth, "filled": args.fill, "kv": args.kv,
              "threads": model.threads, "step_ms": median * 1e3,
              "split_ms": {k: v / args.steps * scale * 1e3 for k, v in shares.items() if k != "total"}}
    if args.ops:
        with tempfile.TemporaryDirectory() as tmp:
            result["ort_op_us"] = ort_ops(model, args.steps, Path(tmp))
    if args.floor:
        from edge_runtime.artifact import read_manifest
        from edge_runtime.bench import read_bandwidth

        floor = statistics.median(floor_steps(model, args.steps))
        per_token = read_manifest(Path(args.model)).bytes_per_token
        bandwidth = read_bandwidth(1 << 30, model.threads)
        result.update(floor_ms=floor * 1e3, bandwidth_gb_s=bandwidth / 1e9, bytes_per_token=per_token,
                      step_fraction=per_token / median / bandwidth, floor_fraction=per_token / floor / bandwidth)
    result["huge_pages"] = huge_pages.status()
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['cpu']}, {result['threads']} threads; {args.model} depth {args.depth}, KV {args.kv}; "
          f"{result['huge_pages']}")
    print(f"decode step {result['step_ms']:.2f} ms (median of {args.steps}); "
          + ", ".join(f"{k} {v:.2f} ms ({v / result['step_ms']:.0%})" for k, v in result["split_ms"].items()))
    if args.floor:
        print(f"weight kernels alone {result['floor_ms']:.2f} ms ({result['floor_ms'] / result['step_ms']:.0%} of the "
              f"step); of bench's ceiling ({result['bandwidth_gb_s']:.1f} GB/s, "
              f"{result['bytes_per_token'] / 2**20:.0f} MiB a token): the step {result['step_fraction']:.3f}, the weight "
              f"kernels alone {result['floor_fraction']:.3f}")
    for op, us in result.get("ort_op_us", {}).items():
        print(f"  {op:32s} {us / 1e3:8.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
