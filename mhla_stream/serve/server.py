"""Puts the pieces together: engine, session store, metrics and the FastAPI app."""
from __future__ import annotations

import json

from .app import ServerConfig, create_app
from .engine import Engine
from .metrics import Metrics
from .sessions import SessionStore


def build_server(model, tokenizer, *, model_name: str, max_batch: int = 32, max_queue: int = 256,
                 max_prompt_tokens: int = 131072, prefill_chunk: int = 512, api_key: str | None = None,
                 sessions_dir: str, session_memory: int = 4 << 30, policy: str | None = None,
                 cuda_graph: bool = True, backend: str = "auto", on_shutdown=None, runner=None,
                 prefill_piece: int | None = None, state_dtype=None, run_ahead: bool = True,
                 admit_tokens: int | None = None, admit_batch: int = 1, async_session_copy: bool = False,
                 admit_wait_ms: float = 0.0):
    """``state_dtype``: storage of every slot's and session's completed block summaries (None =
    fp32; "bf16" halves the state, so about twice the sessions fit: README, State storage).
    ``run_ahead``: plain greedy streams run one decode step ahead of the host (engine.py)."""
    from ..state import dtype_name, resolve_state_dtype
    from ..state_io import StateLayout, model_fingerprint
    model.eval()
    policy = policy or model.config.mixing_policy
    state_dtype = resolve_state_dtype(state_dtype)
    meta = {"model_name": model_name, "policy": policy, "state_dtype": dtype_name(state_dtype),
            "config": json.dumps(model.config.to_diff_dict(), default=str)}
    layout = StateLayout.of(model.new_state(1, policy, device="meta", state_dtype=state_dtype), model.config.vocab_size,
                            model_fingerprint(model))
    if runner is None:  # the state rows, counted before the store makes its folder or reads sessions back
        from .capacity import check_rows_fit
        from .runner import park_rows
        check_rows_fit(model, max_batch, admit_batch=admit_batch, park=park_rows(async_session_copy, model.device),
                       policy=policy, state_dtype=state_dtype)
    store = SessionStore(sessions_dir, session_memory, layout, meta, background=True)  # disk writes off the engine
    metrics = Metrics()
    engine = Engine(model, tokenizer, store, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                    policy=policy, metrics=metrics, cuda_graph=cuda_graph, backend=backend, runner=runner,
                    prefill_piece=prefill_piece, state_dtype=state_dtype, run_ahead=run_ahead,
                    admit_tokens=admit_tokens, admit_batch=admit_batch, async_session_copy=async_session_copy,
                    admit_wait_ms=admit_wait_ms)
    config = ServerConfig(model_name, api_key, max_prompt_tokens)
    app = create_app(engine, tokenizer, store, metrics, config, on_shutdown)
    # the parts ``bridge.serve_split`` runs without this app (--http-process: the app runs in a child)
    app.state.engine, app.state.store, app.state.metrics, app.state.config = engine, store, metrics, config
    app.state.on_shutdown = on_shutdown
    return app
