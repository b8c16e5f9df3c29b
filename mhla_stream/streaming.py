"""``StreamingMHLA``: feed text of any length, generate, fork, save and restore, at bounded memory."""
from __future__ import annotations

import json
import numbers
from collections import deque
from dataclasses import dataclass

import torch

from .cache import MHLACache
from .graphs import GraphDecoder, GraphStep, prefill
from .hub import DEFAULT_MODEL, resolve_model
from .modeling import MHLAForCausalLM
from .plan import ExecutionPlan
from .sampling import SamplingParams, select_next
from .state import MHLAState, dtype_name, resolve_state_dtype
from .state_io import StateFileError, StateLayout, model_fingerprint, read_state_file, validate_state, write_state_file
from .tokenizer import IncrementalDecoder, Tokenizer, TokenizerError


@dataclass
class Snapshot:
    """A copy of everything the stream depends on; restoring it twice gives two independent forks."""
    states: list[MHLAState]
    logits: torch.Tensor | None
    history: list[int]
    position: int
    model: str


class StreamingMHLA:
    def __init__(self, model: MHLAForCausalLM, tokenizer: Tokenizer | None = None, *, policy: str | None = None,
                 backend: str = "auto", prefill_chunk: int = 4096, history: int = 4096, name: str | None = None,
                 cuda_graph: bool = True, state_dtype=None):
        """``state_dtype``: storage of the completed block summaries (the ring, ~94% of the state):
        None / torch.float32 / "fp32" (default) or torch.bfloat16 / "bf16" (half the state memory;
        every sum is still formed in fp32; README "State storage" has the measured effect)."""
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        from .attention import resolve_backend
        resolve_backend(backend, model.device)  # an unknown or unusable backend fails here, not at the first feed
        self.model = model.eval()
        # this stream's own execution plan: the model is shared and never told how to run
        self.plan: ExecutionPlan = model.make_plan(1, backend=backend, policy=policy, cuda_graphs=cuda_graph,
                                                   state_dtype=state_dtype)
        model.prepare_inference()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or "mhla"
        self.prefill_chunk = prefill_chunk
        self.cache = MHLACache(model.new_state(1, policy, state_dtype=state_dtype))
        self._logits: torch.Tensor | None = None  # next-token logits [V], fp32
        self._history: deque[int] = deque(maxlen=history)  # recent ids, for the repetition penalty
        self._fingerprint: str | None = None
        self._graph = None  # CUDA-graph decode step, made on first use (the state is never reallocated)
        self._prefill_graph = None  # likewise for a full prefill chunk

    @classmethod
    def from_pretrained(cls, name_or_path=DEFAULT_MODEL, device=None, dtype=None, *, weights=None, state_dtype=None,
                        **kwargs):
        """``dtype``: the weights' dtype; ``state_dtype``: the ring's storage (see ``__init__``)."""
        resolve_state_dtype(state_dtype)  # a bad value fails before the model is loaded
        path = resolve_model(name_or_path, weights)
        model = MHLAForCausalLM.from_pretrained(path, device=device, dtype=dtype)
        try:
            tokenizer = Tokenizer.from_directory(path)
        except TokenizerError:
            tokenizer = None  # ids still work; text raises a clear error
        return cls(model, tokenizer, name=str(name_or_path), state_dtype=state_dtype, **kwargs)

    # -- read-only facts -------------------------------------------------------------------------
    @property
    def position(self) -> int:
        """Tokens fed into the stream so far (the state's own position)."""
        return int(self.cache.states[0].pos[0])

    @property
    def state_bytes(self) -> int:
        """Bytes of the MHLA state (all layers); constant however long the stream."""
        return self.cache.nbytes

    @property
    def policy(self) -> str:
        return self.cache.states[0].policy

    @property
    def state_dtype(self) -> torch.dtype:
        """Storage dtype of the completed block summaries (the ring); the rest of the state is fp32."""
        return self.cache.states[0].state_dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    # -- feeding ---------------------------------------------------------------------------------
    def _to_ids(self, text_or_ids) -> list[int]:
        """The one input normaliser: text, or a sequence / 1-D tensor of integer ids in the vocab.
        bytes, floats, bools, strings inside lists and unordered sets are refused, never cast."""
        if isinstance(text_or_ids, str):
            if self.tokenizer is None:
                raise TokenizerError(f"model {self.name} has no tokenizer; feed token ids instead of text")
            return self.tokenizer.encode(text_or_ids, add_bos=self.position == 0)
        if isinstance(text_or_ids, (bytes, bytearray, memoryview)):
            raise TypeError("feed takes a str or a sequence of int token ids, got bytes: decode them to str first")
        if isinstance(text_or_ids, torch.Tensor):
            if text_or_ids.is_floating_point() or text_or_ids.is_complex() or text_or_ids.dtype == torch.bool:
                raise TypeError(f"token id tensors must have an integer dtype, got {text_or_ids.dtype}")
            text_or_ids = text_or_ids.flatten().tolist()
        elif isinstance(text_or_ids, (set, frozenset, dict)) or not hasattr(text_or_ids, "__iter__"):
            raise TypeError(f"feed takes a str or a sequence of int token ids, got {type(text_or_ids).__name__}")
        ids = list(text_or_ids)
        wrong = [i for i in ids if not isinstance(i, numbers.Integral) or isinstance(i, bool)]
        if wrong:
            raise TypeError(f"token ids must be ints, got {type(wrong[0]).__name__} {wrong[0]!r:.40}")
        ids = [int(i) for i in ids]
        vocab = self.model.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token ids must be in [0, {vocab}), got {bad[:5]}")
        return ids

    @torch.inference_mode()
    def feed(self, text_or_ids, progress=None) -> int:
        """Adds text (tokenized; a BOS starts a fresh stream) or token ids; returns tokens fed.
        ``progress(done, total)`` is called after each prefill chunk (e.g. to draw a progress bar)."""
        ids = self._to_ids(text_or_ids)
        if not ids:
            return 0
        if self.plan.cuda_graphs and len(ids) >= self.prefill_chunk and self._prefill_graph is None:
            # full chunks replay one captured prefill
            self._prefill_graph = GraphStep(self.model, self.cache, self.prefill_chunk, plan=self.plan)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        self._logits = prefill(self.model, self.cache, x, self.prefill_chunk, self.plan, self._prefill_graph,
                               progress)[0].float()
        self._history.extend(ids)
        return len(ids)

    # -- generation ------------------------------------------------------------------------------
    def sampling_params(self, **sampling) -> SamplingParams:
        """Settings for one generation: the arguments given (None = not given), then the model
        folder's ``generation_config.json``, then the documented defaults (``sampling.DEFAULTS``)."""
        return SamplingParams.resolve(getattr(self.model, "generation_config", None), **sampling)

    def stream(self, prompt=None, max_new_tokens: int | None = None, **sampling):
        """Yields text pieces as tokens are produced (stop strings are held back and cut)."""
        params = self.sampling_params(max_new_tokens=max_new_tokens, **sampling)
        if self.tokenizer is None:
            raise TokenizerError(f"model {self.name} has no tokenizer; use generate_ids")
        if prompt is not None:
            self.feed(prompt)
        decoder = IncrementalDecoder(self.tokenizer, prefix=list(self._history)[-8:])
        pending = ""
        hold = max((len(s) for s in params.stop), default=1) - 1
        for token in self.generate_ids(None, params=params):
            pending += decoder.push(token)
            cut = min((pending.find(s) for s in params.stop if s in pending), default=-1)
            if cut >= 0:
                if pending[:cut]:
                    yield pending[:cut]
                return
            if len(pending) > hold:
                yield pending[: len(pending) - hold]
                pending = pending[len(pending) - hold:]
        pending += decoder.flush()  # bytes of an unfinished character: U+FFFD, as decode shows them
        cut = min((pending.find(s) for s in params.stop if s in pending), default=-1)
        pending = pending[:cut] if cut >= 0 else pending
        if pending:
            yield pending

    def generate(self, prompt=None, max_new_tokens: int | None = None, **sampling) -> str:
        return "".join(self.stream(prompt, max_new_tokens=max_new_tokens, **sampling))

    @torch.inference_mode()
    def generate_ids(self, prompt=None, max_new_tokens: int | None = None, *, params: SamplingParams | None = None,
                     **sampling):
        """Yields generated token ids (eos ends generation and is not fed)."""
        params = params or self.sampling_params(max_new_tokens=max_new_tokens, **sampling)
        if prompt is not None:
            self.feed(prompt)
        if self._logits is None:
            bos = self.model.config.bos_token_id
            if bos is None:
                raise ValueError("nothing has been fed and the model has no BOS token: give a prompt")
            self.feed([bos])
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        eos = self.model.config.eos_token_id
        no_history = torch.empty(1, 0, dtype=torch.long, device=self.device)
        for _ in range(params.max_new_tokens):
            history = no_history if params.repetition_penalty == 1.0 else \
                torch.tensor([list(self._history)], dtype=torch.long, device=self.device)
            token = int(select_next(self._logits[None], history, params, generator))
            if params.stop_at_eos and token == eos:
                return
            self._decode(token)
            yield token

    def _decode(self, token: int) -> None:
        """One token in: the same as ``feed([token])``, through a CUDA graph where there is one."""
        if not self.plan.cuda_graphs:
            self.feed([token])
            return
        if self._graph is None:
            self._graph = GraphDecoder(self.model, self.cache, plan=self.plan)
        x = torch.tensor([[token]], dtype=torch.long, device=self.device)
        self._logits = self._graph.step(x)[0, -1].float()
        self._history.append(token)

    # -- state management ------------------------------------------------------------------------
    def reset(self) -> None:
        self.cache.reset()
        self._logits = None
        self._history.clear()

    def snapshot(self) -> Snapshot:
        return Snapshot([s.clone() for s in self.cache.states], None if self._logits is None else self._logits.clone(),
                        list(self._history), self.position, self.fingerprint)

    def _layout(self) -> StateLayout:
        return StateLayout.of(self.cache.states, self.model.config.vocab_size, self.fingerprint)

    def _install(self, valid) -> None:
        """Copies a validated state into the live one (all checks are done before this runs)."""
        for i, st in enumerate(self.cache.states):
            for n in MHLAState.TENSORS:
                getattr(st, n).copy_(valid.layers[f"layers.{i}.{n}"])
        self._logits = None if valid.logits is None else valid.logits.to(self.device, torch.float32).clone()
        self._history = deque(valid.history, maxlen=self._history.maxlen)
        # the position is the state's pos, copied above (validated equal to the file's position)

    def restore(self, snap: Snapshot) -> None:
        """All or nothing: the snapshot is checked like a state file before anything is copied."""
        if not isinstance(snap, Snapshot):
            raise TypeError(f"restore takes a Snapshot from snapshot(), got {type(snap).__name__}")
        _check_snapshot_fields(snap, self.model.config.vocab_size)
        if snap.model != self.fingerprint:
            raise ValueError("this snapshot was taken from another model")
        if len(snap.states) != len(self.cache.states) or any(st.policy != self.policy for st in snap.states):
            raise ValueError(f"this snapshot was taken from a stream with another policy or layer count "
                             f"(this stream: {self.policy!r}, {len(self.cache.states)} layers)")
        theirs = {st.state_dtype for st in snap.states}
        if theirs != {self.state_dtype}:
            raise ValueError(f"this snapshot stores its block summaries in {', '.join(sorted(map(dtype_name, theirs)))}, "
                             f"this stream in {dtype_name(self.state_dtype)} (state_dtype)")
        tensors = {f"layers.{i}.{n}": getattr(st, n) for i, st in enumerate(snap.states) for n in MHLAState.TENSORS}
        tensors["history"] = torch.tensor(list(snap.history), dtype=torch.long)
        if snap.logits is not None:
            tensors["logits"] = snap.logits
        try:
            valid = validate_state(self._layout(), tensors, snap.position)
        except StateFileError as e:
            raise ValueError(f"this snapshot cannot be restored: {e}") from None
        self._install(valid)

    def save_state(self, path) -> None:
        tensors = {f"layers.{i}.{n}": getattr(s, n) for i, s in enumerate(self.cache.states) for n in MHLAState.TENSORS}
        tensors["history"] = torch.tensor(list(self._history), dtype=torch.long)
        if self._logits is not None:
            tensors["logits"] = self._logits
        meta = {"model": self.fingerprint, "model_name": self.name, "position": str(self.position),
                "policy": self.policy, "state_dtype": dtype_name(self.state_dtype),
                "config": json.dumps(self.model.config.to_diff_dict(), default=str)}
        write_state_file(path, tensors, meta)

    def load_state(self, path) -> None:
        """All or nothing: ``read_state_file`` validates everything, then the live state is overwritten."""
        self._install(read_state_file(path, self._layout()))


def _check_snapshot_fields(snap: Snapshot, vocab_size: int) -> None:
    """A Snapshot's fields are plain attributes anyone can set: their types are checked before any
    value is read (a float in the history would otherwise be cast to an id, a list of logits crash)."""
    if not isinstance(snap.states, (list, tuple)) or not all(isinstance(st, MHLAState) for st in snap.states):
        raise TypeError("this snapshot's states must be a list of MHLAState, as snapshot() makes them")
    if snap.logits is not None and not isinstance(snap.logits, torch.Tensor):
        raise TypeError(f"this snapshot's logits must be a tensor or None, got {type(snap.logits).__name__}")
    if not isinstance(snap.history, (list, tuple)) or \
            not all(isinstance(i, int) and not isinstance(i, bool) for i in snap.history):
        raise TypeError("this snapshot's history must be a list of int token ids")
    if any(not 0 <= i < vocab_size for i in snap.history):
        raise ValueError(f"this snapshot cannot be restored: history holds token ids outside [0, {vocab_size})")


__all__ = ["StreamingMHLA", "Snapshot", "StateFileError"]
