"""jaxinfer: a JAX/XLA inference engine for LLMs: paged KV cache, continuous batching into precompiled buckets."""

from jaxinfer.llm import LLM, generate
from jaxinfer.request import CompletionOutput, Logprob, RequestOutput
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "generate", "SamplingParams", "RequestOutputKind", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
