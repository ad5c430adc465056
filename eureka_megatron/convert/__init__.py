"""Declarative HF <-> Megatron parameter mappings, shared by the converters and weight sync."""
