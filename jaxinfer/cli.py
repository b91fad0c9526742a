"""The `jaxinfer` command line: `chat`, `generate`, `serve`, `convert`, `bench` and `doctor` (see `jaxinfer --help`).

Flags map one to one onto `SamplingParams` (sampling flags) and `EngineConfig` (engine flags). Both are
built, and so validated, before the model loads, so a bad value fails in a second, not after start-up.
Every bad value exits with status 2 and one `error: ...` line naming the flag; Ctrl-C exits with 130.
Progress bars and engine messages go to stderr, so stdout holds only the model's text (or JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from jaxinfer.config import KV_CACHE_DTYPES, QUANTIZATION_CHOICES, EngineConfig, parse_bytes
from jaxinfer.sampling_params import SamplingParams

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Greedy by default: small chat models (the embedded 135M one above all) wander off at temperature 0.7.
CHAT_DEFAULTS = dict(temperature=0.0, top_p=1.0, max_tokens=512)
GENERATE_DEFAULTS = dict(temperature=0.0, top_p=1.0, max_tokens=128)

# SamplingParams / EngineConfig field -> flag, to name the flag in error messages.
FIELD_FLAGS = {
    "n": "-n", "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "min_p": "--min-p",
    "seed": "--seed", "presence_penalty": "--presence-penalty", "frequency_penalty": "--frequency-penalty",
    "repetition_penalty": "--repetition-penalty", "stop": "--stop", "stop_token_ids": "--stop-token-id",
    "max_tokens": "--max-tokens", "min_tokens": "--min-tokens", "logprobs": "--logprobs",
    "max_model_len": "--max-model-len", "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens", "token_buckets": "--token-buckets",
    "mixed_step_token_budget": "--mixed-step-token-budget",
    "seq_buckets": "--seq-buckets", "decode_buckets": "--decode-buckets", "page_size": "--page-size",
    "kv_cache_memory": "--kv-cache-memory",
    "dtype": "--dtype", "load_format": "--load-format", "attention_impl": "--attention-impl",
    "quantization": "--quantization", "kv_cache_dtype": "--kv-cache-dtype",
    "enable_prefix_caching": "--no-prefix-caching", "async_scheduling": "--no-async-scheduling",
    "speculative_config": "--speculative-config", "tensor_parallel_size": "--tensor-parallel-size",
    "data_parallel_size": "--data-parallel-size", "enable_expert_parallel": "--enable-expert-parallel",
}

EPILOG = """\
examples:
  jaxinfer chat "What is the capital of France?"      one answer, streamed
  jaxinfer chat --system "You are a pirate."           interactive chat (/exit or Ctrl-D quits)
  jaxinfer generate "The meaning of life is" --max-tokens 32
  jaxinfer generate "Once upon a time" -n 3 --temperature 0.9 --json
  jaxinfer bench --json-out bench.json                 speed on this machine, against HF transformers

Without --model the embedded SmolLM2-135M-Instruct (GGUF) is used. Start-up compiles every step shape
once (about half a minute on a laptop CPU); later runs load them from the compilation cache.
"""


# -- argument types -----------------------------------------------------------------------------------------


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= minimum."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _dataset(s: str) -> str:
    """A bench length distribution. `sharegpt` is refused by name: vLLM's reads the ShareGPT file, ours are drawn."""
    if s == "sharegpt":
        raise argparse.ArgumentTypeError("no dataset file is read here; sharegpt-like draws seeded lengths shaped "
                                         "like ShareGPT's")
    return s


def _int_list(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in s.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers like 1,4,16, got {s!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 1 like 1,4,16, got {s!r}")
    return vals


def _json_object(s: str) -> dict:
    try:
        v = json.loads(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"method\": \"ngram\"}}', got {s!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return v


def _byte_size(s: str) -> str:
    try:
        if parse_bytes(s) <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 2GiB, 512MiB or 1e9, got {s!r}") from None
    return s


# -- shared flag groups (serve reuses these) ---------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", "-m", metavar="PATH",
        help="an HF checkpoint directory, a .gguf file, or a preset name from configs/models "
        "(presets need --load-format dummy); default: the embedded SmolLM2-135M-Instruct",
    )


def add_multihost_args(parser: argparse.ArgumentParser) -> None:
    """Flags of a multi-host engine (jaxinfer/multihost.py); read by `join_hosts`."""
    g = parser.add_argument_group(
        "multi-host (one engine over the devices of several processes; run the same command on every host)")
    g.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="process 0's address, where jax.distributed's coordination service listens "
                        "(default: $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=_positive_int, metavar="N",
                   help="how many processes the engine spans (default: $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, metavar="I",
                   help="this process's index, 0 .. N-1; process 0 serves, the others follow its steps "
                        "(default: $JAX_PROCESS_ID)")
    g.add_argument("--distributed", action="store_true",
                   help="join by jax's cluster detection (Cloud TPU VMs, GKE, SLURM, Open MPI) where the three "
                        "values above are not given")


def join_hosts(args: argparse.Namespace) -> bool:
    """jax.distributed.initialize from the multi-host flags (`add_multihost_args`) or the environment; whether this is
    a multi-host run."""
    from jaxinfer import multihost

    return multihost.initialize(args.coordinator_address, args.num_processes, args.process_id, auto=args.distributed)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags mapping onto `EngineConfig` fields; `engine_options_from_args` reads them back."""
    g = parser.add_argument_group("engine options (how the model runs)")
    g.add_argument("--engine-config", metavar="NAME|FILE",
                   help="defaults for the options below from configs/engine/NAME.json or a JSON file, e.g. "
                   "h100-llama-3.1-8b; flags given explicitly override it")
    g.add_argument("--max-model-len", type=_positive_int, metavar="N",
                   help="longest sequence (prompt + output) in tokens; default: the model's context length")
    g.add_argument("--max-num-seqs", type=_positive_int, metavar="N",
                   help="most sequences decoded together in one step (default: 16)")
    g.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, metavar="N",
                   help="split the model over the first N devices (tensor parallelism over a jax.sharding mesh; "
                        "kv heads held N / K times when the model has K < N of them; default: 1)")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="a mixture-of-experts model's experts split over the --tensor-parallel-size devices by expert "
                        "(whole experts per device) instead of by MLP width")
    g.add_argument("--data-parallel-size", "-dp", type=_positive_int, metavar="M",
                   help="M engine replicas in this process, each on --tensor-parallel-size devices of its own, behind "
                        "one front: a request goes to the replica caching the longest prefix of its prompt, else the "
                        "least loaded (default: 1)")
    g.add_argument("--max-num-batched-tokens", type=_positive_int, metavar="N",
                   help="most tokens processed in one step; longer prompts are split (default: largest token bucket)")
    g.add_argument("--mixed-step-token-budget", type=_positive_int, metavar="N",
                   help="most tokens of a step that carries decodes: prompt chunks get what the decodes leave, which "
                        "bounds the time between a stream's tokens while long prompts come in (default: the token "
                        "budget on GPU / TPU, 64 on a CPU)")
    g.add_argument("--token-buckets", type=_int_list, metavar="LIST",
                   help="step sizes in tokens compiled ahead of time, e.g. 1,4,16,64,256 (the default)")
    g.add_argument("--seq-buckets", type=_int_list, metavar="LIST",
                   help="step sizes in sequences compiled ahead of time, e.g. 1,4,16 (the default)")
    g.add_argument("--decode-buckets", type=_int_list, metavar="LIST",
                   help="more row counts for decode steps only, e.g. 8,48,96,160: one program each, fewer rows "
                        "padded (default: none, the seq buckets)")
    g.add_argument("--page-size", type=_positive_int, metavar="N",
                   help="tokens per KV-cache page, a power of two (default: 16)")
    g.add_argument("--kv-cache-memory", type=_byte_size, metavar="SIZE",
                   help="memory for the KV cache per device, e.g. 2GiB or 512MiB (default: sized from free memory)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight and activation type (default: auto = float32 on CPU, bfloat16 on GPU/TPU)")
    g.add_argument("--load-format", choices=["auto", "safetensors", "gguf", "dummy"],
                   help="how to read weights; dummy = random weights of the model's shape (default: auto)")
    g.add_argument("--quantization", choices=list(QUANTIZATION_CHOICES), metavar="SCHEME",
                   help="weights: int8 / int4 / fp8 quantize a float checkpoint at load (int8: W8A16 per channel, "
                   "int4: W4A16 groups of 128, fp8: W8A8 with per-token activation scales); none dequantizes a "
                   "quantized checkpoint; gguf / gptq / awq / auto-round / compressed-tensors name the checkpoint's "
                   "own format (checked). Default: as the checkpoint is (quantized checkpoints stay quantized)")
    g.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), metavar="DTYPE",
                   help="KV cache type: auto (the model's), or fp8 / int8: 8-bit, twice the tokens in the same "
                   "memory, with per-layer per-head scales calibrated at start-up (default: auto)")
    g.add_argument("--attention-impl", choices=["auto", "reference", "xla", "tpu", "gpu"],
                   help="ragged paged-attention implementation: auto = the backend's Pallas kernel where it "
                   "has one, else the jnp form (xla) (default: auto)")
    g.add_argument("--no-prefix-caching", action="store_true",
                   help="recompute every prompt from scratch instead of reusing the KV cache of an earlier "
                   "prompt's identical prefix")
    g.add_argument("--no-async-scheduling", action="store_true",
                   help="finish each step before scheduling the next (default: the next step is launched while "
                   "the device still runs the current one)")
    g.add_argument("--speculative-config", type=_json_object, metavar="JSON",
                   help="speculative decoding, exact (the same tokens as without), as vLLM's: e.g. '{\"method\": "
                   "\"ngram\", \"num_speculative_tokens\": 3, \"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}' "
                   "(n-gram prompt lookup), or '{\"method\": \"draft_model\", \"model\": PATH, "
                   "\"num_speculative_tokens\": 3}' (a smaller checkpoint with the same tokenizer; \"quantization\" "
                   "for its weights), or '{\"method\": \"eagle\", \"model\": PATH, \"num_speculative_tokens\": 3}' "
                   "(an EAGLE-1 head; \"eagle3\" for an EAGLE-3 head); \"disable_by_batch_size\": N turns drafts "
                   "off past N running requests; steps that may carry drafts run one after the other, no async "
                   "scheduling (default: off)")
    g.add_argument("--adaptive-buckets", action="store_true",
                   help="learn step sizes from the traffic: every 256 prompt-carrying (or decode) steps, the token "
                        "sizes and decode row counts that would have saved the most padding are compiled in the "
                        "background (up to 8 programs) and used from then on, and remembered for the next start "
                        "(default: off)")
    g.add_argument("--compilation-cache-dir", metavar="DIR",
                   help="where compiled step programs are kept between runs (default: ~/.cache/jaxinfer/xla)")
    g.add_argument("--no-compilation-cache", action="store_true",
                   help="compile everything afresh and do not write the compilation cache")
    g.add_argument("--engine-seed", type=int, metavar="N",
                   help="seed for random weights and for requests that give no --seed (default: 0)")
    g.add_argument("--quiet", "-q", action="store_true", help="hide progress bars and start-up messages")


def engine_options_from_args(args: argparse.Namespace) -> dict:
    """Only the engine flags that were given (over --engine-config), so EngineConfig's own defaults apply to the rest."""
    opts = {}
    if getattr(args, "engine_config", None):
        from jaxinfer.config import engine_preset

        try:
            opts.update(engine_preset(args.engine_config))
        except ValueError as e:
            raise UsageError(f"--engine-config: {e}") from None
    names = ["max_model_len", "max_num_seqs", "max_num_batched_tokens", "mixed_step_token_budget", "token_buckets",
             "seq_buckets", "decode_buckets", "page_size", "kv_cache_memory", "dtype", "load_format", "quantization",
             "kv_cache_dtype", "attention_impl", "compilation_cache_dir", "speculative_config", "tensor_parallel_size",
             "data_parallel_size"]
    opts.update({k: getattr(args, k) for k in names if getattr(args, k, None) is not None})
    if getattr(args, "engine_seed", None) is not None:
        opts["seed"] = args.engine_seed
    if getattr(args, "no_prefix_caching", False):
        opts["enable_prefix_caching"] = False
    if getattr(args, "no_async_scheduling", False):
        opts["async_scheduling"] = False
    if getattr(args, "no_compilation_cache", False):
        opts["use_compilation_cache"] = False
    if getattr(args, "adaptive_buckets", False):
        opts["adaptive_buckets"] = True
    if getattr(args, "enable_expert_parallel", False):
        opts["enable_expert_parallel"] = True
    if getattr(args, "quiet", False):
        opts["show_progress"] = False
    return opts


def add_sampling_args(parser: argparse.ArgumentParser, defaults: dict, multi: bool = True) -> None:
    """Flags mapping onto `SamplingParams`; `defaults` overrides temperature / top_p / max_tokens."""
    d = defaults
    g = parser.add_argument_group("sampling options (what gets generated)")
    g.add_argument("--temperature", "-t", type=float, default=d["temperature"], metavar="T",
                   help="randomness; 0 = always the most likely token (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=d["top_p"], metavar="P",
                   help="sample only from the most likely tokens whose probabilities add up to P, in (0, 1] "
                   "(default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample only from the K most likely tokens; 0 = no limit (default: %(default)s)")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens less likely than P times the most likely one, in [0, 1] (default: %(default)s)")
    g.add_argument("--max-tokens", type=int, default=d["max_tokens"], metavar="N",
                   help="most tokens to generate (default: %(default)s)")
    g.add_argument("--min-tokens", type=int, default=0, metavar="N",
                   help="generate at least N tokens before an end-of-sequence token may stop (default: %(default)s)")
    g.add_argument("--seed", type=int, metavar="N", help="seed for this request's sampling, for reproducible output")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when this text is generated (not included in the output); repeatable")
    g.add_argument("--stop-token-id", action="append", type=int, metavar="ID",
                   help="stop when this token id is generated; repeatable")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="X",
                   help="> 1 discourages any token already in the prompt or output (default: %(default)s)")
    g.add_argument("--presence-penalty", type=float, default=0.0, metavar="X",
                   help="in [-2, 2]; > 0 discourages tokens already generated (default: %(default)s)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X",
                   help="in [-2, 2]; > 0 discourages tokens by how often they were generated (default: %(default)s)")
    if multi:
        g.add_argument("-n", type=int, default=1, metavar="N", help="completions per prompt (default: %(default)s)")
    g.add_argument("--logprobs", type=int, metavar="K",
                   help="also return each token's log-probability and the K most likely alternatives")
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past the end-of-sequence token, up to --max-tokens")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    """Raises ValueError (naming the parameter) on a bad value."""
    return SamplingParams(
        n=getattr(args, "n", 1), temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.seed, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
        stop=args.stop, stop_token_ids=args.stop_token_id, max_tokens=args.max_tokens,
        min_tokens=args.min_tokens, ignore_eos=args.ignore_eos, logprobs=args.logprobs,
    )


# -- the parser ------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error:` line (pointing at --help) instead of the whole usage."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see `{self.prog} --help`)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    from jaxinfer import __version__, bench

    parser = _Parser(
        prog="jaxinfer", formatter_class=_Formatter, epilog=EPILOG,
        description="jaxinfer: LLM inference on JAX/XLA (CPU, GPU, TPU) with a paged KV cache and continuous batching.",
    )
    parser.add_argument("--version", action="version", version=f"jaxinfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    chat = sub.add_parser(
        "chat", formatter_class=_Formatter, help="talk to a chat model (one question, or an interactive session)",
        description="Answer MESSAGE through the model's chat template, streaming the reply as it is generated.\n"
        "Without MESSAGE, start an interactive session that keeps the conversation: type a line and press Enter;\n"
        "/reset forgets the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply.\n\n"
        "Decoding is greedy by default (temperature 0, up to 512 tokens): small models answer best that way;\n"
        "pass --temperature 0.7 --top-p 0.9 for varied replies. Unless\n"
        "--max-num-seqs or --seq-buckets is given, only one-sequence step shapes are compiled (faster start).",
        epilog='examples:\n  jaxinfer chat "Write a haiku about the sea."\n'
        '  jaxinfer chat --system "Answer in French." --temperature 0.7 --top-p 0.9\n'
        '  echo "Summarise: ..." | jaxinfer chat -      (MESSAGE "-" reads it from stdin)',
    )
    chat.add_argument("message", nargs="?", metavar="MESSAGE",
                      help="the message to answer; leave out for an interactive session, '-' to read stdin")
    chat.add_argument("--system", metavar="TEXT", help="a system prompt placed before the conversation")
    add_model_args(chat)
    add_sampling_args(chat, CHAT_DEFAULTS, multi=False)
    add_engine_args(chat)
    chat.set_defaults(func=run_chat)

    gen = sub.add_parser(
        "generate", formatter_class=_Formatter, help="complete raw text prompts (no chat template)",
        description="Continue each PROMPT as plain text and print the completions (all prompts run as one batch).\n"
        "Defaults are greedy (temperature 0) and up to 128 new tokens; --chat wraps each prompt as a\n"
        "user message through the chat template instead.",
        epilog='examples:\n  jaxinfer generate "The capital of France is"\n'
        '  jaxinfer generate "Roses are red," "Twinkle twinkle" --max-tokens 20\n'
        '  jaxinfer generate "Tell me a joke" --chat -n 2 --temperature 0.8 --json\n'
        '  jaxinfer generate "2+2=" --logprobs 3 --max-tokens 1 --json',
    )
    gen.add_argument("prompts", nargs="+", metavar="PROMPT", help="text to continue; several run as a batch")
    gen.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    gen.add_argument("--system", metavar="TEXT", help="with --chat: a system prompt before each message")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON document: text, token ids, finish reason, logprobs, timings")
    add_model_args(gen)
    add_sampling_args(gen, GENERATE_DEFAULTS)
    add_engine_args(gen)
    add_multihost_args(gen)
    gen.set_defaults(func=run_generate)

    serve = sub.add_parser(
        "serve", formatter_class=_Formatter, help="an OpenAI-compatible HTTP server (completions, chat, streaming)",
        description="Serve the model over HTTP with the OpenAI API: /v1/completions, /v1/chat/completions,\n"
        "/v1/models, plus /tokenize, /detokenize, /health, /ready, /metrics and /openapi.json, and a chat\n"
        "page for the browser at /.\n"
        "SIGTERM or Ctrl-C stops admitting requests, waits --shutdown-timeout for running ones, then exits 0.",
        epilog="examples:\n  jaxinfer serve --port 8000\n  jaxinfer serve --model ./my-llama --api-key secret --max-n 4",
    )
    add_model_args(serve)
    srv = serve.add_argument_group("server options")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    srv.add_argument("--api-key", metavar="KEY", action="append",
                     help="require `Authorization: Bearer KEY` on /v1 routes; repeat for several keys (default: "
                          "$JAXINFER_API_KEY, several separated by commas)")
    srv.add_argument("--api-key-file", metavar="PATH",
                     help="more keys, one per line (blank lines and # comments ignored); keep it private")
    srv.add_argument("--served-model-name", metavar="NAME",
                     help="the model id clients send (default: the --model path, or the default model's name)")
    srv.add_argument("--max-n", type=_positive_int, default=8, metavar="N",
                     help="most completions per request (default: %(default)s)")
    srv.add_argument("--max-body-size", type=_byte_size, default="1MiB", metavar="SIZE",
                     help="largest request body (default: %(default)s)")
    srv.add_argument("--max-queued-requests", type=_positive_int, default=256, metavar="N",
                     help="requests waiting to start before new ones get 429 (default: %(default)s)")
    srv.add_argument("--max-queued-tokens", type=_positive_int, default=None, metavar="N",
                     help="tokens (prompt + max_tokens x n) of the requests waiting to start before new ones get 429 "
                          "(default: no limit beyond --max-queued-requests)")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                     help="on SIGTERM, seconds to let running requests finish (default: %(default)s)")
    srv.add_argument("--step-timeout", type=float, default=120.0, metavar="S",
                     help="the watchdog: an engine step running longer fails the requests in flight (500) and makes "
                          "/ready answer 503 until it returns; 0 turns it off (default: %(default)s)")
    srv.add_argument("--no-chat-page", action="store_true",
                     help="do not serve the browser chat page at / (it calls /v1 as any client does, with the API key "
                          "typed into it)")
    add_engine_args(serve)
    add_multihost_args(serve)
    serve.set_defaults(func=run_serve)

    conv = sub.add_parser(
        "convert", formatter_class=_Formatter,
        help="convert a model once (weights as an orbax checkpoint, tokenizer, compiled programs) for fast starts",
        description="Read MODEL (an HF checkpoint directory, a .gguf file, or a preset with --load-format dummy),\n"
        "quantize it if --quantization asks, and save it to OUT: the weights as an orbax checkpoint (restored\n"
        "straight onto a mesh of any size, also from gs://), the tokenizer, and the compiled programs of the\n"
        "engine options given (--engine-config ...) for this machine's devices. `jaxinfer serve --model OUT`\n"
        "then starts without converting or compiling where the machine and options match (else it says why and\n"
        "compiles). Run it on the kind of machine that will serve, or pass --no-programs.",
        epilog="examples:\n  jaxinfer convert ./Llama-3.1-8B-Instruct ./llama8b-fp8 --quantization fp8 "
        "--engine-config h100-llama-3.1-8b\n  jaxinfer convert ./model.gguf ./converted --no-programs\n"
        "  gcloud storage cp -r ./llama8b-fp8 gs://BUCKET/   then   jaxinfer serve --model gs://BUCKET/llama8b-fp8",
    )
    conv.add_argument("source", metavar="MODEL", help="the model to convert (as --model of the other commands; an "
                      "empty string '' for the embedded default model)")
    conv.add_argument("out", metavar="OUT", help="a new (or empty) directory to write")
    conv.add_argument("--device-kind", metavar="KIND",
                      help="the devices the compiled programs are for, as jax names them (e.g. 'NVIDIA H100 80GB "
                           "HBM3', 'TPU v5 lite'); must be this machine's (default: this machine's)")
    conv.add_argument("--no-programs", action="store_true", help="save the weights and tokenizer only")
    add_engine_args(conv)
    conv.set_defaults(func=run_convert)

    doc = sub.add_parser(
        "doctor", formatter_class=_Formatter,
        help="check this machine: versions, devices, kernels, caches, the model; each problem with its fix",
        description="Report what jaxinfer finds on this machine: the versions of jax and its plugin and of the\n"
        "libraries jaxinfer uses, jax's backend and devices with their memory, the kernel each path runs here\n"
        "(attention, quantized matmuls), the compilation cache (usable? its saved programs), the tokenizer cache,\n"
        "the XLA autotune results shipped for this GPU, and the default model (or --model). Problems come last,\n"
        "each with the command that fixes it. Nothing is written (a missing cache directory is reported, not\n"
        "made), except that on a CPU the native kernel is built if it was not yet.\n"
        "Exit status: 0 no problems, 1 some (listed last).",
        epilog="examples:\n  jaxinfer doctor\n  jaxinfer doctor --json | jq .problems\n"
        "  jaxinfer doctor --model ./llama8b-fp8 --compilation-cache-dir /mnt/cache/xla",
    )
    doc.add_argument("--json", action="store_true",
                     help="print one JSON object (versions, backend, devices, kernels, caches, model, problems)")
    doc.add_argument("--compilation-cache-dir", metavar="DIR",
                     help="the compilation cache to check (default: the engine's, $JAXINFER_CACHE_DIR/xla or "
                     "~/.cache/jaxinfer/xla)")
    doc.add_argument("--model", "-m", metavar="PATH",
                     help="also check this model: a converted model directory (do its programs fit this machine?), "
                     "an HF checkpoint directory, a .gguf file, or a preset name")
    doc.set_defaults(func=run_doctor)

    bench.add_parser(sub)
    return parser


def api_keys_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    """--api-key (repeated), else $JAXINFER_API_KEY (comma-separated), plus --api-key-file's lines."""
    keys = list(args.api_key or [k for k in os.environ.get("JAXINFER_API_KEY", "").split(",")])
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--api-key-file: cannot read {args.api_key_file} ({e})") from None
        if os.name == "posix" and os.stat(args.api_key_file).st_mode & 0o077:
            print(f"warning: --api-key-file {args.api_key_file} is readable by others; `chmod 600` it",
                  file=sys.stderr)
        keys += [ln for ln in (line.strip() for line in lines) if ln and not ln.startswith("#")]
        if not any(k.strip() for k in keys):
            raise UsageError(f"--api-key-file: {args.api_key_file} holds no key")
    return tuple(dict.fromkeys(k.strip() for k in keys if k.strip()))


def run_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from serving.api_server import ServerConfig, serve

    opts = check_options(engine_options_from_args(args))
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port: must be in [0, 65535], got {args.port}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if join_hosts(args):
        opts = multihost_options(opts)
        if not _is_leader():  # the engine's steps only: process 0 serves
            from jaxinfer import multihost
            from jaxinfer.engine import Engine

            return multihost.follow(Engine(args.model, **opts))
    name = args.served_model_name or args.model or "SmolLM2-135M-Instruct"
    config = ServerConfig(model_name=name, api_keys=api_keys_from_args(args), max_n=args.max_n,
                          max_body_size=parse_bytes(args.max_body_size),
                          max_queued_requests=args.max_queued_requests, max_queued_tokens=args.max_queued_tokens,
                          shutdown_timeout=args.shutdown_timeout, step_timeout=args.step_timeout or None,
                          chat_page=not args.no_chat_page)

    def factory():
        from jaxinfer.data_parallel import make_engine

        return make_engine(args.model, **opts)

    return asyncio.run(serve(factory, config, args.host, args.port))


# -- main ------------------------------------------------------------------------------------------------


class UsageError(Exception):
    """Bad user input discovered after parsing: printed as one `error:` line, exit status 2."""


def run_convert(args: argparse.Namespace) -> int:
    from jaxinfer.convert import convert

    opts = check_options(engine_options_from_args(args))
    m = convert(args.source, args.out, programs=not args.no_programs, device_kind=args.device_kind, **opts)
    progs = m["programs"][0] if m["programs"] else None
    print(json.dumps({"out": args.out, "source": m["source"], "quantization": m["quantization"],
                      "programs": None if progs is None else {k: progs[k] for k in ("device_kind", "devices", "jax")},
                      "seconds": m["_seconds"]}))
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    from jaxinfer import doctor

    report = doctor.collect(args.compilation_cache_dir, args.model)
    print(json.dumps(report, indent=2) if args.json else doctor.format_text(report), flush=True)
    return 1 if report["problems"] else 0


def describe_error(e: BaseException) -> str:
    """One line that names the flag: `top_p must be ...` -> `--top-p: top_p must be ...`."""
    msg = " ".join(str(e).split()) or type(e).__name__
    head = msg.split(" ", 1)[0]
    if head.endswith(":") and head[:-1] in FIELD_FLAGS:  # "max_tokens: this model's ..."
        return f"{FIELD_FLAGS[head[:-1]]}:{msg[len(head):]}"
    if head in FIELD_FLAGS:
        return f"{FIELD_FLAGS[head]}: {msg}"
    words = set(re.findall(r"[a-z_]+", msg))
    flags = [flag for field, flag in FIELD_FLAGS.items() if field in words and "_" in field]
    flags += [flag for phrase, flag in (("token bucket", "--token-buckets"), ("seq bucket", "--seq-buckets"))
              if phrase in msg and flag not in flags]
    return f"{msg} (see {', '.join(flags)})" if flags else msg


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # jaxinfer only uses transformers' tokenizers and configs; its "PyTorch was not found" advice is noise here.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or argparse's own usage error (already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for records such as bench's JSON
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"error: {describe_error(e)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `jaxinfer generate ... | head -1`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


def check_options(engine_options: dict) -> dict:
    """Validate the engine options before the (slow) model load; returns them unchanged."""
    EngineConfig.from_options(**engine_options)
    return engine_options


def multihost_options(opts: dict) -> dict:
    """A multi-host engine spans every device unless told otherwise."""
    import jax

    return {"tensor_parallel_size": jax.device_count(), **opts}


def _is_leader() -> bool:
    from jaxinfer import multihost

    return multihost.is_leader()


def build_llm(args: argparse.Namespace, engine_options: dict):
    from jaxinfer.llm import LLM

    return LLM(args.model, **engine_options)


# -- chat ------------------------------------------------------------------------------------------------


def chat_engine_options(args: argparse.Namespace) -> dict:
    opts = engine_options_from_args(args)
    if "max_num_seqs" not in opts and "seq_buckets" not in opts:
        opts.update(max_num_seqs=1, seq_buckets=(1,))  # one conversation: single-sequence shapes only
    return opts


def stream_reply(engine, prompt_ids: list[int], params: SamplingParams, out=None):
    """Run one request, writing each new piece of its text to `out` as it arrives; returns the final output."""
    out = out or sys.stdout
    rid = engine.add_request(prompt_ids, params)
    shown = 0
    try:
        while True:
            for o in engine.step():
                if o.request_id != rid:
                    continue
                text = o.outputs[0].text
                if len(text) > shown:
                    out.write(text[shown:])
                    out.flush()
                    shown = len(text)
                if o.finished:
                    return o
    except KeyboardInterrupt:
        engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
        raise


def fit_to_context(engine, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
    """Shorten max_tokens to what the context leaves, so a long conversation still gets an answer."""
    import dataclasses

    room = engine.max_model_len - len(prompt_ids)
    if room < 1:
        raise UsageError(
            f"the conversation ({len(prompt_ids)} tokens) fills the model's context ({engine.max_model_len} tokens)"
        )
    if params.max_tokens is None or params.max_tokens <= room:
        return params
    return dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))


def run_chat(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)
    opts = check_options(chat_engine_options(args))
    message = args.message
    if message == "-":
        message = sys.stdin.read().strip()
        if not message:
            raise UsageError("MESSAGE: nothing was read from stdin")
    elif message is not None and not message.strip():
        raise UsageError("MESSAGE: must not be empty")
    history = [{"role": "system", "content": args.system}] if args.system else []

    llm = build_llm(args, opts)
    engine = llm.engine
    if engine.tokenizer is None:
        raise UsageError("--model: this model has no tokenizer, so it cannot chat")

    if message is not None:
        ids = engine.tokenizer.apply_chat_template(history + [{"role": "user", "content": message}])
        stream_reply(engine, ids, fit_to_context(engine, ids, params))
        sys.stdout.write("\n")
        sys.stdout.flush()
        return 0
    return chat_repl(engine, params, history, args.system)


def _read_line(prompt: str) -> str | None:
    if sys.stdin.isatty():
        try:
            return input(prompt)
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line


def chat_repl(engine, params: SamplingParams, history: list[dict], system: str | None) -> int:
    tty = sys.stdin.isatty()
    if tty:
        print("Type a message and press Enter. /reset forgets the conversation, /exit or Ctrl-D quits, "
              "Ctrl-C stops a reply.", file=sys.stderr, flush=True)
    while True:
        line = _read_line(">>> ")
        if line is None:  # EOF
            if tty:
                print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit", "/bye"):
            return 0
        if line == "/reset":
            history = [{"role": "system", "content": system}] if system else []
            print("(conversation cleared)", file=sys.stderr, flush=True)
            continue
        if line in ("/help", "/?"):
            print("/reset: forget the conversation   /exit: quit", file=sys.stderr, flush=True)
            continue
        turn = history + [{"role": "user", "content": line}]
        ids = engine.tokenizer.apply_chat_template(turn)
        try:
            out = stream_reply(engine, ids, fit_to_context(engine, ids, params))
        except UsageError as e:
            print(f"error: {e}; /reset to start over", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:  # stop this reply, keep the session; the turn is forgotten
            print("\n(stopped)", file=sys.stderr, flush=True)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history = turn + [{"role": "assistant", "content": out.outputs[0].text}]


# -- generate --------------------------------------------------------------------------------------------


def run_generate(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)
    opts = check_options(engine_options_from_args(args))
    if any(not p for p in args.prompts):
        raise UsageError("PROMPT: must not be empty")
    if join_hosts(args):
        opts = multihost_options(opts)
    llm = build_llm(args, opts)
    if not _is_leader():
        return llm.follow()
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        outs = llm.chat([system + [{"role": "user", "content": p}] for p in args.prompts], params,
                        use_tqdm=not args.quiet)
    else:
        outs = llm.generate(list(args.prompts), params, use_tqdm=not args.quiet)
    if args.json:
        json.dump([output_to_dict(o) for o in outs], sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        several = len(outs) > 1 or params.n > 1
        for i, o in enumerate(outs):
            for c in o.outputs:
                if several:
                    print(f"--- prompt {i}" + (f", completion {c.index}" if params.n > 1 else "") + " ---")
                print(c.text)
    sys.stdout.flush()
    return 0


def output_to_dict(o) -> dict:
    """A RequestOutput as plain JSON types."""
    m = o.metrics
    return {
        "request_id": o.request_id,
        "prompt": o.prompt,
        "prompt_token_ids": list(o.prompt_token_ids),
        "outputs": [
            {
                "index": c.index,
                "text": c.text,
                "token_ids": list(c.token_ids),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
                "cumulative_logprob": c.cumulative_logprob,
                "logprobs": None if c.logprobs is None else [
                    [{"token_id": t, "token": lp.decoded_token, "logprob": lp.logprob, "rank": lp.rank}
                     for t, lp in pos.items()]
                    for pos in c.logprobs
                ],
            }
            for c in o.outputs
        ],
        "metrics": None if m is None else {
            "num_prompt_tokens": m.num_prompt_tokens,
            "num_generated_tokens": m.num_generated_tokens,
            "ttft_s": m.ttft,
            "tpot_s": m.tpot,
            "e2e_latency_s": m.e2e_latency,
        },
    }


if __name__ == "__main__":
    sys.exit(main())
