"""The generation options the commands take (`bart-jax summarize`, `warmup`, `aot`), by flag."""

# flag -> (GenerationConfig field, type)
GENERATION_FLAGS = {
    "--num-beams": ("num_beams", int),
    "--num-return-sequences": ("num_return_sequences", int),
    "--max-length": ("max_length", int),
    "--max-new-tokens": ("max_new_tokens", int),
    "--min-length": ("min_length", int),
    "--min-new-tokens": ("min_new_tokens", int),
    "--length-penalty": ("length_penalty", float),
    "--no-repeat-ngram-size": ("no_repeat_ngram_size", int),
    "--repetition-penalty": ("repetition_penalty", float),
    "--temperature": ("temperature", float),
    "--top-k": ("top_k", int),
    "--top-p": ("top_p", float),
}
