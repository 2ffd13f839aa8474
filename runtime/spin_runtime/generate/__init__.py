"""Generation of the self-play data: θt answers the selected prompts, one shard per pod.

``cli`` (argv, sharding, bad input), ``runner`` (records, metrics, shard + manifest), and two
backends behind :class:`~spin_runtime.generate.backends.Backend`: transformers (CPU, tests,
small models) and vLLM (GPUs at scale; also the CPU build in tests).
"""
