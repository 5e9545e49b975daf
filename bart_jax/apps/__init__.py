"""What users run: the `bart-jax` command, batch summarization, pipelines, conversion and the
side-by-side benchmark."""
