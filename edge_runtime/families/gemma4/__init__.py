"""Gemma 4 "E" models (E2B, E4B): per-layer embeddings, KV sharing, sliding and full attention.

The reference is transformers/models/gemma4/modeling_gemma4.py (transformers >= 5.23). config.py reads its
config.json, shapes.py gives its tensors and the planner's shapes, plan.py the step plan the engine executes, and
graphs.py (export only) builds the graphs.
"""

from edge_runtime.families.family import Family
from edge_runtime.families.gemma4.config import Gemma4Spec, checkpoint_layout, spec_from_hf_config
from edge_runtime.families.gemma4.plan import contract
from edge_runtime.families.gemma4.shapes import EMBEDDING, PLE_TABLE, activation_width, checkpoint_tensors, graph_parts

FAMILY = Family(
    spec_type=Gemma4Spec,
    title="Gemma 4",
    model_types=("gemma4", "gemma4_text"),
    read_config=spec_from_hf_config,
    checkpoint_layout=checkpoint_layout,
    checkpoint_tensors=checkpoint_tensors,
    embedding=EMBEDDING,
    ple_table=PLE_TABLE,
    contract=contract,
    graph_parts=graph_parts,
    activation_width=activation_width,
    graphs="edge_runtime.families.gemma4.graphs",
)
