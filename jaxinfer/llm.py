"""The offline API: `LLM(model).generate(prompts, params)` and `.chat(conversations, params)`."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from jaxinfer.data_parallel import make_engine
from jaxinfer.request import RequestOutput
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """An engine plus a loop that runs it until every submitted request is done.

    `model`: None for the embedded default (SmolLM2-135M-Instruct), an HF checkpoint directory, a .gguf
    file, or a preset name from configs/models (with load_format="dummy"). `engine_options` are the fields
    of `jaxinfer.config.EngineConfig` (max_num_seqs, token_buckets, kv_cache_memory, ...).
    """

    def __init__(self, model: str | None = None, **engine_options):
        self.engine = make_engine(model, **engine_options)  # an Engine, or data_parallel_size replicas of one
        self.tokenizer = self.engine.tokenizer

    def follow(self) -> int:
        """On every process of a multi-host engine but the first (`jaxinfer.multihost`): run the first process's steps
        until it stops (0) or is lost (1). Process 0 calls `generate` / `chat` as usual."""
        from jaxinfer import multihost

        return multihost.follow(self.engine)

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Prompts as text, or token ids (one list of ints, or a list of them). Outputs come back in input order."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if isinstance(prompts, (bytes, dict)) or not hasattr(prompts, "__iter__"):
            raise ValueError(f"prompts: expected a string, a list of token ids or a list of prompts, got "
                             f"{type(prompts).__name__}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts: must not be empty")
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        ids = []
        try:  # validate everything before anything runs
            for p, sp in zip(prompts, params):
                if sp is not None and not isinstance(sp, SamplingParams):
                    raise ValueError(f"sampling_params: expected SamplingParams, got {type(sp).__name__}")
                # Only the final outputs are read here: the engine need not build one per request per step.
                sp = dataclasses.replace(sp or SamplingParams(), output_kind=RequestOutputKind.FINAL_ONLY)
                ids.append(self.engine.add_request(p, sp))
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            self._drain()
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them, through the model's chat template."""
        if self.tokenizer is None:
            raise ValueError("messages: this model has no tokenizer / chat template")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not convs:
            raise ValueError("messages: must not be empty")
        texts = [self.tokenizer.render_chat(c, add_generation_prompt=add_generation_prompt) for c in convs]
        # only the template writes control tokens: content that spells one is read as text
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt) for c in convs]
        outs = self.generate(prompts, sampling_params, use_tqdm)
        for out, text in zip(outs, texts):
            out.prompt = text  # as vLLM: the prompt the model saw, as text
        return outs

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        pending = set(ids)
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        final[out.request_id] = out
                        pending.discard(out.request_id)
                        bar.update()
        return [final[i] for i in ids]

    def _drain(self) -> None:
        while self.engine.has_unfinished():
            self.engine.step()


_SHARED_LLMS: dict[tuple, LLM] = {}


def shared_llm(model: str | None = None, **engine_options) -> LLM:
    """The process-wide LLM for (model, options): built (loaded and compiled) on first use, then reused."""
    def hashable(v):
        return tuple(v) if isinstance(v, list) else tuple(sorted(v.items())) if isinstance(v, dict) else v

    key = (model, tuple(sorted((k, hashable(v)) for k, v in engine_options.items())))
    if key not in _SHARED_LLMS:
        _SHARED_LLMS[key] = LLM(model, **engine_options)
    return _SHARED_LLMS[key]


def generate(
    prompts,
    sampling_params: SamplingParams | None = None,
    *,
    model: str | None = None,
    use_tqdm: bool = False,
    **engine_options,
) -> list[RequestOutput]:
    """One-call generation for research code: `jaxinfer.generate(["..."], SamplingParams(max_tokens=64))`.

    The engine for (model, engine_options) is built on the first call and reused by later ones.
    """
    return shared_llm(model, **engine_options).generate(prompts, sampling_params, use_tqdm=use_tqdm)
