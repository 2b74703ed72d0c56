"""What megatron-core lacks for MSA: context-parallel token split and K/V/index-key gather
(context.py), and the process groups of TP ranks that share a replicated KV group (replicas.py)."""
