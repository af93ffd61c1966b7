"""Concurrency: how requests running at the same time share the model.

`llm_scheduler` runs one LLM decode step for every active request (continuous batching),
`decode_graphs` makes that step a fixed-shape call recorded as a CUDA graph on a GPU, and
`flow_batching` runs the flow decoder for overlapping requests as one padded batch, streaming
chunks before final calls. Each is
tested to give what a request running alone would get.
"""
