"""The five transformers heads over BART's encoder-decoder: the bare model, conditional
generation (LM head), sequence classification, question answering and the causal LM.

Each head is a Flax module whose parameter tree matches transformers' state dict name for name
(bart_jax/checkpoints/conversion.py); `HEADS` maps transformers' architecture names to them.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bart_jax.model import losses
from bart_jax.model.layers import LayerModule
from bart_jax.model.linear import Linear, VocabularyProjection, vocabulary_product
from bart_jax.model.outputs import CausalLMOutput, DecoderOutput, EncoderOutput, Seq2SeqOutput
from bart_jax.model.partitioning import LOGITS, constrain
from bart_jax.model.stacks import (
    BartDecoder,
    BartEncoder,
    BartModule,
    last_eos_index,
    shift_tokens_right,
    token_embedding,
)

Array = jax.Array
Dtype = Any


class BartModel(BartModule):
    """The bare encoder-decoder (transformers' `BartModel`): returns the decoder's last hidden state."""

    def setup(self):
        config = self.config
        self.shared = token_embedding(config, self.dtype, self.param_dtype)
        # transformers 5 unties the encoder's and decoder's token embeddings from `shared` (and
        # from each other) when tie_word_embeddings is False; `shared` is then unused by the forward pass.
        tied = self.shared if config.tie_word_embeddings else None
        self.encoder = BartEncoder(config, **self.options(), shared_embedding=tied)
        self.decoder = BartDecoder(config, **self.options(), shared_embedding=tied)

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, head_mask=None,
               output_attentions=False, output_hidden_states=False, deterministic=True) -> EncoderOutput:
        """Runs the encoder alone; see `BartEncoder.__call__`."""
        if self.is_initializing() and not self.config.tie_word_embeddings:
            self.shared(jnp.zeros((1, 1), jnp.int32))  # create the unused `shared` table that checkpoints hold
        return self.encoder(input_ids, attention_mask, inputs_embeds, head_mask, output_attentions,
                            output_hidden_states, deterministic)

    def decode(self, decoder_input_ids=None, encoder_hidden_states=None, encoder_attention_mask=None,
               decoder_attention_mask=None, decoder_inputs_embeds=None, decoder_head_mask=None,
               cross_attn_head_mask=None, cross_key_values=None, cache=None, cache_index=None,
               output_attentions=False, output_hidden_states=False, deterministic=True) -> DecoderOutput:
        """Runs the decoder alone; see `BartDecoder.__call__`."""
        return self.decoder(
            decoder_input_ids, decoder_attention_mask, encoder_hidden_states, encoder_attention_mask,
            decoder_inputs_embeds, decoder_head_mask, cross_attn_head_mask, cross_key_values, cache, cache_index,
            output_attentions, output_hidden_states, deterministic,
        )

    def __call__(
        self,
        input_ids: Optional[Array] = None,
        attention_mask: Optional[Array] = None,
        decoder_input_ids: Optional[Array] = None,
        decoder_attention_mask: Optional[Array] = None,
        head_mask: Optional[Array] = None,
        decoder_head_mask: Optional[Array] = None,
        cross_attn_head_mask: Optional[Array] = None,
        encoder_outputs: Optional[EncoderOutput] = None,
        inputs_embeds: Optional[Array] = None,
        decoder_inputs_embeds: Optional[Array] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        deterministic: bool = True,
    ) -> Seq2SeqOutput:
        """The full encoder-decoder pass with transformers' argument names.

        Without decoder_input_ids/decoder_inputs_embeds, the decoder reads input_ids shifted right.
        """
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass decoder_input_ids or decoder_inputs_embeds, or input_ids to shift right")
            decoder_input_ids = shift_tokens_right(
                input_ids, self.config.pad_token_id, self.config.decoder_start_token_id
            )
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, attention_mask, inputs_embeds, head_mask, output_attentions,
                                          output_hidden_states, deterministic)
        decoder_outputs = self.decode(
            decoder_input_ids, encoder_outputs.last_hidden_state, attention_mask, decoder_attention_mask,
            decoder_inputs_embeds, decoder_head_mask, cross_attn_head_mask,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            deterministic=deterministic,
        )
        return Seq2SeqOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


class BartForConditionalGeneration(BartModule):
    """BART with the language-modelling head (tied to the shared embedding) and `final_logits_bias`."""

    def setup(self):
        config = self.config
        self.model = BartModel(config, **self.options())
        self.final_logits_bias = self.param(
            "final_logits_bias", nn.initializers.zeros, (1, config.vocab_size), self.param_dtype
        )
        if not config.tie_word_embeddings:
            self.lm_head = VocabularyProjection(config.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                                kernels=self.kernels, weight_init=nn.initializers.normal(config.init_std))

    def lm_logits(self, hidden_states: Array) -> Array:
        """hidden_states [..., d_model] -> logits [..., vocab] in the compute dtype."""
        if self.config.tie_word_embeddings:
            logits = vocabulary_product(hidden_states, self.model.shared.embedding, self.dtype, self.kernels)
        else:
            logits = self.lm_head(hidden_states)
        # A buffer in transformers, never trained: no gradient flows into it (nor is one computed).
        logits = logits + jax.lax.stop_gradient(self.final_logits_bias[0]).astype(logits.dtype)
        return constrain(logits.astype(self.dtype), LOGITS)

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, head_mask=None,
               output_attentions=False, output_hidden_states=False, deterministic=True) -> EncoderOutput:
        """Runs the encoder alone: input_ids [batch, source] -> EncoderOutput."""
        return self.model.encode(input_ids, attention_mask, inputs_embeds, head_mask, output_attentions,
                                 output_hidden_states, deterministic)

    def project_cross_key_values(self, encoder_hidden_states: Array) -> tuple[dict[str, Array], ...]:
        """encoder_hidden_states [batch, source, d_model] -> per layer {"key", "value"}, in the layout
        of this model's kernels (`BartAttention.project_key_value`)."""
        return self.model.decoder.project_cross_key_values(encoder_hidden_states)

    def decode_step(
        self,
        decoder_input_ids: Array,
        cache: tuple[dict[str, Array], ...],
        cache_index: Array,
        cross_key_values: tuple[dict[str, Array], ...],
        encoder_attention_mask: Optional[Array] = None,
    ) -> tuple[Array, tuple[dict[str, Array], ...]]:
        """One incremental decoder call over a static cache.

        decoder_input_ids [rows, length] written at positions cache_index.. cache_index+length-1;
        cross_key_values from `project_cross_key_values` (rows = batch * beams share them); the cache
        from `init_cache` with this model's kernel policy;
        encoder_attention_mask [batch, source]. Returns (float32 logits [rows, length, vocab], new cache).
        """
        outputs = self.model.decode(
            decoder_input_ids, encoder_attention_mask=encoder_attention_mask, cross_key_values=cross_key_values,
            cache=cache, cache_index=cache_index,
        )
        return self.lm_logits(outputs.last_hidden_state).astype(jnp.float32), outputs.cache

    def decode(self, decoder_input_ids=None, encoder_hidden_states=None, encoder_attention_mask=None,
               decoder_attention_mask=None, **kwargs) -> CausalLMOutput:
        """Decoder plus LM head: returns CausalLMOutput(logits [rows, length, vocab], ...)."""
        outputs = self.model.decode(decoder_input_ids, encoder_hidden_states, encoder_attention_mask,
                                    decoder_attention_mask, **kwargs)
        return CausalLMOutput(
            logits=self.lm_logits(outputs.last_hidden_state), hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, cross_attentions=outputs.cross_attentions, cache=outputs.cache,
        )

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 head_mask=None, decoder_head_mask=None, cross_attn_head_mask=None, encoder_outputs=None,
                 inputs_embeds=None, decoder_inputs_embeds=None, labels=None, output_attentions=False,
                 output_hidden_states=False, deterministic=True) -> Seq2SeqOutput:
        """transformers' forward: labels [batch, target] (-100 ignored) give `loss`; without
        decoder inputs, the decoder reads the labels shifted right."""
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        outputs = self.model(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, head_mask, decoder_head_mask,
            cross_attn_head_mask, encoder_outputs, inputs_embeds, decoder_inputs_embeds, output_attentions,
            output_hidden_states, deterministic,
        )
        logits = self.lm_logits(outputs.last_hidden_state)
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return outputs.replace(loss=loss, logits=logits, last_hidden_state=None)


class BartClassificationHead(LayerModule):
    """dropout -> dense -> tanh -> dropout -> out_proj, on the pooled hidden state."""

    def setup(self):
        config = self.config
        linear = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels,
                      weight_init=nn.initializers.normal(config.init_std))
        self.dense = Linear(config.d_model, **linear)
        self.out_proj = Linear(config.num_labels, **linear)
        self.dropout = nn.Dropout(config.classifier_dropout)

    def __call__(self, pooled: Array, deterministic: bool = True) -> Array:
        """pooled [batch, d_model] -> logits [batch, num_labels]."""
        hidden = self.dropout(pooled, deterministic=deterministic)
        hidden = jnp.tanh(self.dense(hidden))
        hidden = self.dropout(hidden, deterministic=deterministic)
        return self.out_proj(hidden)


class BartForSequenceClassification(BartModule):
    """Classifies from the decoder state at the last EOS of each row (transformers' pooling)."""

    def setup(self):
        self.model = BartModel(self.config, **self.options())
        self.classification_head = BartClassificationHead(self.config, self.dtype, self.param_dtype, self.kernels)

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 head_mask=None, decoder_head_mask=None, cross_attn_head_mask=None, encoder_outputs=None,
                 decoder_inputs_embeds=None, labels=None, output_attentions=False, output_hidden_states=False,
                 deterministic=True) -> Seq2SeqOutput:
        """input_ids [batch, length] (needed for EOS pooling); labels [batch] ids, [batch] or
        [batch, num_labels] floats, per `problem_type`. Returns logits [batch, num_labels]."""
        outputs = self.model(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, head_mask, decoder_head_mask,
            cross_attn_head_mask, encoder_outputs, None, decoder_inputs_embeds, output_attentions,
            output_hidden_states, deterministic,
        )
        hidden_states = outputs.last_hidden_state
        rows = jnp.arange(hidden_states.shape[0])
        pooled = hidden_states[rows, last_eos_index(input_ids, self.config.eos_token_id)]
        logits = self.classification_head(pooled, deterministic)
        loss = None
        if labels is not None:
            problem_type = losses.classification_problem_type(self.config.problem_type, self.config.num_labels, labels)
            loss = losses.sequence_classification_loss(logits, labels, problem_type)
        return outputs.replace(loss=loss, logits=logits, last_hidden_state=None)


class BartForQuestionAnswering(BartModule):
    """Span extraction: start/end logits over the decoder states."""

    def setup(self):
        self.model = BartModel(self.config, **self.options())
        self.qa_outputs = Linear(2, dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels,
                                 weight_init=nn.initializers.normal(self.config.init_std))

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 head_mask=None, decoder_head_mask=None, cross_attn_head_mask=None, encoder_outputs=None,
                 start_positions=None, end_positions=None, inputs_embeds=None, decoder_inputs_embeds=None,
                 output_attentions=False, output_hidden_states=False, deterministic=True) -> Seq2SeqOutput:
        """Returns start_logits, end_logits [batch, length]; with start/end_positions [batch], the loss."""
        outputs = self.model(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, head_mask, decoder_head_mask,
            cross_attn_head_mask, encoder_outputs, inputs_embeds, decoder_inputs_embeds, output_attentions,
            output_hidden_states, deterministic,
        )
        logits = self.qa_outputs(outputs.last_hidden_state)
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = losses.span_loss(start_logits, end_logits, start_positions, end_positions)
        return outputs.replace(loss=loss, start_logits=start_logits, end_logits=end_logits, last_hidden_state=None)


class BartDecoderWrapper(BartModule):
    """Holds the decoder under `model/decoder`, the layout of transformers' BartForCausalLM."""

    def setup(self):
        self.decoder = BartDecoder(self.config, **self.options())

    def __call__(self, *args, **kwargs) -> DecoderOutput:
        return self.decoder(*args, **kwargs)


class BartForCausalLM(BartModule):
    """The decoder alone with an LM head tied to its own token embedding."""

    def setup(self):
        config = self.config
        self.model = BartDecoderWrapper(config, **self.options())
        if not config.tie_word_embeddings:
            self.lm_head = VocabularyProjection(config.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                                kernels=self.kernels, weight_init=nn.initializers.normal(config.init_std))

    def __call__(self, input_ids=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                 inputs_embeds=None, head_mask=None, cross_attn_head_mask=None, labels=None, cache=None,
                 cache_index=None, output_attentions=False, output_hidden_states=False,
                 deterministic=True) -> CausalLMOutput:
        """input_ids [batch, length]; labels [batch, length] are NOT shifted (as transformers 5):
        labels[:, i] is the target of logits[:, i]."""
        outputs = self.model(
            input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, inputs_embeds, head_mask,
            cross_attn_head_mask, None, cache, cache_index, output_attentions, output_hidden_states, deterministic,
        )
        if self.config.tie_word_embeddings:
            logits = vocabulary_product(outputs.last_hidden_state, self.model.decoder.embed_tokens.embedding,
                                        self.dtype, self.kernels).astype(self.dtype)
        else:
            logits = self.lm_head(outputs.last_hidden_state)
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return CausalLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions, cache=outputs.cache,
        )


# The head classes by transformers' name; what the rest of the package needs to know about each
# (checkpoint layout, tied keys, generation, training tasks, ...) is in bart_jax/model/registry.py.
HEADS = {module.__name__: module for module in (
    BartModel, BartForConditionalGeneration, BartForSequenceClassification, BartForQuestionAnswering, BartForCausalLM,
)}


def head_class(name: str) -> type[nn.Module]:
    """The module class for a transformers architecture name such as "BartForConditionalGeneration"."""
    try:
        return HEADS[name]
    except KeyError:
        raise ValueError(f"unknown BART head {name!r}; choose one of {sorted(HEADS)}") from None
