"""Gemma 3n E2B / E4B text models: AltUp streams, LAuReL, sparse MLP activations, per-layer embeddings, KV sharing.

The reference is transformers/models/gemma3n/modeling_gemma3n.py (transformers >= 5.23); the multimodal checkpoint's
vision and audio towers and embedders are not exported. config.py reads its config.json, shapes.py gives its tensors
and the planner's shapes, plan.py the step plan the engine executes, and graphs.py (export only) builds the graphs.
"""

from edge_runtime.families.family import Family
from edge_runtime.families.gemma3n.config import Gemma3nSpec, checkpoint_layout, spec_from_hf_config
from edge_runtime.families.gemma3n.plan import contract
from edge_runtime.families.gemma3n.shapes import activation_width, checkpoint_tensors, graph_parts
from edge_runtime.families.gemma4.shapes import EMBEDDING, PLE_TABLE  # the same tables as Gemma 4's

FAMILY = Family(
    spec_type=Gemma3nSpec,
    title="Gemma 3n",
    model_types=("gemma3n", "gemma3n_text"),
    read_config=spec_from_hf_config,
    checkpoint_layout=checkpoint_layout,
    checkpoint_tensors=checkpoint_tensors,
    embedding=EMBEDDING,
    ple_table=PLE_TABLE,
    contract=contract,
    graph_parts=graph_parts,
    activation_width=activation_width,
    graphs="edge_runtime.families.gemma3n.graphs",
)
