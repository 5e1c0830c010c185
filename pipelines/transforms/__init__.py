"""The embedding pipeline's stages: decode (bytes -> validated pixels or a dead letter),
the JAX model handler for RunInference, and the per-unit shard writer."""
