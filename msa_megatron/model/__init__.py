"""MSA inside megatron-core: attention modules, index branch, layer specs, model builder."""
