"""Raw text -> megatron indexed datasets (.bin/.idx) + manifest; `python -m data_prep --help`."""
