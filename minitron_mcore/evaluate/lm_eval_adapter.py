"""lm-evaluation-harness model ``minitron``: downstream tasks scored on a Megatron checkpoint.

    python -m minitron_mcore.evaluate.lm_eval_cli --model minitron --model_args load=CKPT \\
        --tasks minitron_stdlib_mc --include_path examples/lm_eval_tasks --batch_size 16
    torchrun --nproc-per-node 2 -m minitron_mcore.evaluate.lm_eval_cli --model minitron \\
        --model_args load=CKPT,tp=2 --tasks TASKS
    minitron evaluate load=CKPT lm_eval_tasks=[minitron_stdlib_mc] lm_eval_include=[DIR]

From Python, importing this module registers the model (lm-eval has no entry-point discovery for
models, so ``lm_eval --model minitron`` needs the import; ``lm_eval_cli`` is lm-eval's own CLI
with the import done first)::

    import lm_eval
    import minitron_mcore.evaluate.lm_eval_adapter  # noqa: F401
    lm_eval.simple_evaluate(model="minitron", model_args="load=CKPT", tasks=[...])

``model_args``: ``load`` (the checkpoint); ``dtype`` (auto|fp32|bf16, or float32|bfloat16;
auto = bf16 on a GPU that has it); ``max_batch_tokens`` (padded tokens per forward pass,
default 4096: bounds the full-vocabulary logits); ``max_length`` (default: the model's
``max_position_embeddings``); ``max_gen_toks`` (default 256); ``add_bos_token``,
``prefix_token_id`` (as for lm-eval's ``hf``); ``tp``, ``pp``. Requests per forward pass come
from lm-eval's ``--batch_size`` (its CLI default is 1: pass e.g. 16; ``auto`` = up to
``--max_batch_size``, default 64), or ``batch_size`` in Python (default 16).

The contract is that of lm-eval's ``hf`` model, so a checkpoint and its ``export-hf`` copy get
the same scores (tests/test_lm_eval.py): the same token ids (:mod:`.lm_eval_codec`), contexts
truncated from the left to ``max_length``, rolling windows for ``loglikelihood_rolling``, greedy
decoding that stops at EOS, at a stop string or after ``max_gen_toks`` tokens. Requests are
sorted longest first and right-padded into batches; causal attention means a row never sees its
padding, so no attention mask is needed and a batched score equals the unbatched one. Greedy
decoding recomputes the whole sequence at every step (no KV cache): exact, simple, and slower
than a serving engine on long generations.

Under tensor/pipeline parallelism every rank runs every request (lm-eval sees one process, the
way it treats TP launchers); full-vocabulary logits are gathered over TP
(:func:`~minitron_mcore.models.forward.forward_logits`), and the last pipeline stage shares its
results with the other stages. Data-parallel replicas repeat the work.
"""

from __future__ import annotations

import json

# lm_eval.models registers the built-in models (as lazy placeholders). It must run before our
# registration: lm-eval fills its registry only while it is empty, so a registry holding just
# `minitron` would hide `hf`, `vllm`, ...
import lm_eval.models  # noqa: F401
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from minitron_mcore.errors import require
from minitron_mcore.evaluate.lm_eval_codec import TextCodec
from minitron_mcore.utils.log import log0, progress

DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16"}
"""lm-eval's ``hf`` spelling of ``dtype`` model_args, accepted too."""


def length_batches(order: list[int], lengths: list[int], batch_size: int, max_tokens: int):
    """Consecutive runs of ``order`` (indices sorted longest first) with at most ``batch_size``
    rows and at most ``max_tokens`` padded tokens each (at least one row)."""
    i = 0
    while i < len(order):
        width = max(1, lengths[order[i]])  # the batch's longest row: order is descending
        n = max(1, min(batch_size, max_tokens // width))
        yield order[i : i + n]
        i += n


def right_pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """[b, max len] token ids, each row padded on the right."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def score_continuation(logits: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """``logits`` [n, vocab] predicting the n continuation tokens -> (sum of their log-probs,
    whether each is the argmax)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, v]
    target = torch.tensor(cont, dtype=torch.long, device=logp.device)
    greedy = bool((logp.argmax(dim=-1) == target).all())
    return float(logp.gather(-1, target[:, None]).sum()), greedy


def _bar(desc: str, total: int, disable: bool):
    """Our rank-0 progress bar, or a silent one when lm-eval asks for none."""
    from tqdm import tqdm

    return tqdm(total=total, disable=True) if disable else progress(None, desc, total=total)


def _from_last_stage(obj):
    """``obj`` of the last pipeline stage, on every stage (identity without PP)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from minitron_mcore.parallel import comm_device

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(
        box,
        src=ps.get_pipeline_model_parallel_last_rank(),
        group=ps.get_pipeline_model_parallel_group(),
        device=comm_device(),
    )
    return box[0]


@register_model("minitron")
class MinitronLM(TemplateLM):
    """A minitron (Megatron-Core) checkpoint behind lm-eval's ``LM`` interface."""

    backend = "causal"

    def __init__(
        self,
        load: str = "",
        dtype: str = "auto",
        batch_size: int | str = 16,
        max_batch_size: int | None = None,
        max_batch_tokens: int = 4096,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        tp: int = 1,
        pp: int = 1,
        seed: int = 1234,
        device: str | None = None,
        loaded: tuple | None = None,
        **unused,
    ):
        """``loaded=(model, meta, tokenizer_path)``: an already-built model inside an active
        parallel context (``minitron evaluate``) instead of ``load``. ``device`` is accepted
        for lm-eval's CLI and ignored: the model runs where Megatron placed it."""
        super().__init__()
        if unused:
            log0("lm-eval minitron: ignoring model_args %s", sorted(unused))
        if loaded is None:
            require(bool(load), "lm-eval model minitron needs model_args load=CHECKPOINT")
            loaded = self._load(load, dtype, int(tp), int(pp), int(seed))
        self.model, self.meta, tokenizer_path = loaded
        self.arch = self.meta.arch
        self.codec = TextCodec(tokenizer_path, add_bos_token, prefix_token_id)
        self.tokenizer = self.codec.hf  # lm-eval reads chat templates from it
        require(
            self.codec.vocab_size <= self.arch.vocab_size,
            f"the tokenizer has {self.codec.vocab_size} tokens but the model only "
            f"{self.arch.vocab_size}",
        )
        self.load_path = load
        auto = str(batch_size).startswith("auto")
        self._batch_size = int(max_batch_size or 64) if auto else int(batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self._max_length = int(max_length or self.arch.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        require(self._batch_size > 0 and self.max_batch_tokens > 0, "batch sizes must be > 0")
        from minitron_mcore.parallel import device

        self._device = device()

    @classmethod
    def from_loaded(cls, model, meta, tokenizer_path: str, **kw) -> MinitronLM:
        return cls(loaded=(model, meta, tokenizer_path), **kw)

    @staticmethod
    def _load(load: str, dtype: str, tp: int, pp: int, seed: int):
        """Distributed start-up (a one-process gloo/nccl group unless launched by torchrun /
        srun) and the checkpoint's model, in eval mode."""
        import atexit

        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from minitron_mcore.checkpoint.layout import resolve_tokenizer_path
        from minitron_mcore.checkpoint.megatron import load_model, read_meta
        from minitron_mcore.models.build import train_dtype
        from minitron_mcore.parallel import ParallelConfig, init_parallel, shutdown

        meta = read_meta(load)
        meta.arch.check_parallel(tp, pp)
        owner = not dist.is_initialized()
        same_layout = ps.model_parallel_is_initialized() and (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
        ) == (tp, pp)
        if not same_layout:
            init_parallel(ParallelConfig(tp=tp, pp=pp), seed)
        if owner:
            atexit.register(shutdown)
        model, meta = load_model(load, train_dtype(DTYPE_ALIASES.get(dtype, dtype)))
        model.eval()
        return model, meta, resolve_tokenizer_path(load)

    # ------------------------------------------------------------------ what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.codec.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.codec.prefix_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.codec.path.replace("/", "__")

    def get_model_info(self) -> dict:
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "model_checkpoint": self.load_path,
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        ids = self.codec.encode(string, add_special_tokens)
        left = kw.get("left_truncate_len")
        return ids[-left:] if left else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.codec.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        require(self.tokenizer is not None, "chat templates need a Hugging Face tokenizer")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # ------------------------------------------------------------------ forward passes
    def _on_last_stage(self, rows: list[list[int]], fn):
        """Run the model on right-padded ``rows``; ``fn(logits [b, s, vocab])`` on the last
        pipeline stage; its result on every rank."""
        from minitron_mcore.models.forward import forward_logits

        logits = forward_logits(self.model, right_pad(rows, self.eot_token_id), self.arch)
        return _from_last_stage(fn(logits) if logits is not None else None)

    def _batches(self, lengths: list[int], extra: int = 0):
        """Request indices sorted longest first (ties by index), batched by
        ``batch_size`` and ``max_batch_tokens`` (with ``extra`` tokens per row to come)."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        return length_batches(
            order, [n + extra for n in lengths], self._batch_size, self.max_batch_tokens
        )

    # ------------------------------------------------------------------ log-likelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        """``requests``: (key, context ids, continuation ids) -> (log p(continuation), is
        greedy) each. The input is context + continuation without its last token, cut from the
        left to ``max_length`` (as lm-eval's hf model does)."""
        rows = []
        for _, ctx, cont in requests:
            require(0 < len(cont) <= self._max_length, "continuation longer than max_length")
            rows.append(((ctx + cont)[-(self._max_length + 1) :][:-1], cont))
        results: list = [None] * len(rows)
        bar = _bar("lm-eval loglikelihood", len(rows), disable_tqdm)
        for batch in self._batches([len(r[0]) for r in rows]):
            inps = [rows[i][0] for i in batch]

            def score(logits, batch=batch, inps=inps):
                out = []
                for b, (i, inp) in enumerate(zip(batch, inps)):
                    cont = rows[i][1]
                    out.append(score_continuation(logits[b, len(inp) - len(cont) : len(inp)], cont))
                return out

            for i, answer in zip(batch, self._on_last_stage(inps, score)):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scores: each text in disjoint windows of ``max_length`` tokens, the
        first one conditioned on the prefix token, every token predicted once."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, scores):
            totals[n] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations; requests with equal generation kwargs are batched together."""
        from lm_eval.models.utils import (
            handle_stop_sequences,
            normalize_gen_kwargs,
            postprocess_generated_text,
        )

        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            key = json.dumps(req.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(n)
        results: list = [None] * len(requests)
        bar = _bar("lm-eval generate", len(requests), disable_tqdm)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0.0:
                log0("lm-eval minitron: sampling is not supported; decoding greedily")
            room = self._max_length - max_new
            require(room > 0, f"max_gen_toks={max_new} leaves no room in max_length")
            prompts = [self.tok_encode(requests[n].args[0])[-room:] for n in members]
            for batch in self._batches([len(p) for p in prompts], extra=max_new):
                outs = self.greedy([prompts[b] for b in batch], max_new, until)
                for b, ids in zip(batch, outs):
                    n = members[b]
                    text = postprocess_generated_text(self.tok_decode(ids), until, None)
                    results[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
                bar.update(len(batch))
        bar.close()
        return results

    def greedy(self, prompts: list[list[int]], max_new: int, until: list[str]) -> list[list[int]]:
        """Greedy decoding of a batch: each row stops at EOS (not kept), once its decoded
        continuation contains a string of ``until``, or after ``max_new`` tokens."""
        seqs = [list(p) for p in prompts]
        outs: list[list[int]] = [[] for _ in prompts]
        live = list(range(len(prompts)))
        for _ in range(max_new):
            if not live:
                break
            rows = [seqs[i] for i in live]

            def next_ids(logits, rows=rows):
                last = torch.tensor([len(r) - 1 for r in rows], device=logits.device)
                return (
                    logits[torch.arange(len(rows), device=logits.device), last].argmax(-1).tolist()
                )

            still = []
            for i, tok in zip(live, self._on_last_stage(rows, next_ids)):
                if tok == self.eot_token_id:
                    continue
                seqs[i].append(tok)
                outs[i].append(tok)
                text = self.tok_decode(outs[i], skip_special_tokens=False)
                if not any(s and s in text for s in until):
                    still.append(i)
            live = still
        return outs
