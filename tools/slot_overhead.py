"""What a LoRA slot costs a graph run besides its arithmetic, in one process: the slot as a LoraSlotInt8 node after
its product against inside the product (MatMulInt4's optional slot inputs), empty and at rank 16; and what a graph
input costs, handed to `session.run` on every run against bound once through an IO binding (as the decode step
does). tools/lora_slot_cost.py measures whole decode steps across processes, whose spread is wider than these costs.

    python tools/slot_overhead.py [--chain 200] [--width 128] [--repeats 60]

A chain of --chain products of --width x --width (int4 block 128, in cache, so the call costs and not the weights
show), 2 threads, medians of alternating batches of 5 runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge_runtime import onnxruntime_ops
from edge_runtime.weight_formats import Int4

SLOT = ("a", "b", "s")


def _session(parts: dict[str, np.ndarray], width: int, chain: int, kind: str, own_inputs: bool = False):
    """kind: "none" (no slots), "nodes" (a LoraSlotInt8 after each product) or "fused" (the slot in the product);
    own_inputs: each product's slot has inputs of its own (else all share one)."""
    inits = [numpy_helper.from_array(parts["codes"], "codes"), numpy_helper.from_array(parts["scale"], "scales")]
    if kind == "fused":
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "columns"))
    names = [tuple(f"{n}{i}" for n in SLOT) if own_inputs else SLOT for i in range(chain)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])]
    for a, b, s in (dict.fromkeys(names) if kind != "none" else []):
        inputs += [helper.make_tensor_value_info(a, TensorProto.INT8, [f"{a}.rank", width]),
                   helper.make_tensor_value_info(b, TensorProto.INT8, [f"{a}.rank", width]),
                   helper.make_tensor_value_info(s, TensorProto.FLOAT, [f"{a}.rank"])]
    nodes, x = [], "x"
    for i in range(chain):
        y = f"y{i}"
        if kind == "fused":
            nodes.append(helper.make_node(onnxruntime_ops.MATMUL_INT4, [x, "codes", "scales", "columns", *names[i]],
                                          [y], domain=onnxruntime_ops.DOMAIN))
        elif kind == "nodes":
            nodes += [helper.make_node(onnxruntime_ops.MATMUL_INT4, [x, "codes", "scales"], [f"p{i}"],
                                       domain=onnxruntime_ops.DOMAIN),
                      helper.make_node(onnxruntime_ops.LORA_SLOT_INT8, [x, f"p{i}", *names[i]], [y],
                                       domain=onnxruntime_ops.DOMAIN)]
        else:
            nodes.append(helper.make_node(onnxruntime_ops.MATMUL_INT4, [x, "codes", "scales"], [y],
                                          domain=onnxruntime_ops.DOMAIN))
        x = y
    graph = helper.make_graph(nodes, "chain", inputs, [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid(onnxruntime_ops.DOMAIN, onnxruntime_ops.OPSET)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    onnxruntime_ops.register(options, Path(__file__), "the chains are", "run on x86-64-v3 or aarch64")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), names


def _median_ms(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(5):
                run()
            times[name].append((time.perf_counter() - start) / 5)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", type=int, default=200)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    width, chain = args.width, args.chain
    parts = Int4(128).encode(rng.standard_normal((width, width)).astype(np.float32) * 0.03)
    x = rng.standard_normal((1, width)).astype(np.float32)
    slots = {0: (np.zeros((0, width), np.int8), np.zeros((0, width), np.int8), np.zeros(0, np.float32)),
             16: (rng.integers(-127, 128, (16, width), dtype=np.int8), rng.integers(-127, 128, (16, width), dtype=np.int8),
                  np.full(16, 1e-6, np.float32))}
    print(f"onnxruntime {ort.__version__}, 2 threads, a chain of {chain} products {width} x {width}")
    runs = {}
    for kind in ("none", "nodes", "fused"):
        session, _ = _session(parts, width, chain, kind)
        for rank in (0,) if kind == "none" else (0, 16):
            feeds = {"x": x} | ({} if kind == "none" else dict(zip(SLOT, slots[rank])))
            runs[f"{kind}, rank {rank}"] = (lambda s=session, f=feeds: s.run(None, f))
    ms = _median_ms(runs, args.repeats)
    for name, value in ms.items():
        print(f"  {name:16s} {value:7.3f} ms a run, {(value - ms['none, rank 0']) / chain * 1e3:+6.2f} us a slot")
    session, names = _session(parts, width, chain, "fused", own_inputs=True)
    shared, _ = _session(parts, width, chain, "fused")
    feeds = {"x": x} | {n: v for slot in names for n, v in zip(slot, slots[0])}
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    binding.bind_output(session.get_outputs()[0].name)
    few = {"x": x} | dict(zip(SLOT, slots[0]))
    ms = _median_ms({"fed": lambda: session.run(None, feeds), "bound": lambda: session.run_with_iobinding(binding),
                     "shared": lambda: shared.run(None, few)}, args.repeats)
    extra = len(feeds) - len(few)
    print(f"  {len(feeds)} inputs fed to run {ms['fed']:.3f} ms, bound once {ms['bound']:.3f} ms, "
          f"{len(few)} fed {ms['shared']:.3f} ms: {(ms['fed'] - ms['shared']) / extra * 1e3:.2f} us a fed input, "
          f"{(ms['bound'] - ms['shared']) / extra * 1e3:.2f} us a bound one")


if __name__ == "__main__":
    main()
