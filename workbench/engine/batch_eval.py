"""Batch generation: a JSONL file of prompts in, a JSONL file of completions out, in input order.

Each input line is a JSON object with ``prompt`` (raw text) or ``messages`` (a chat, formatted
with the model's template), and optionally ``id`` (default: the line number) and ``max_tokens``.
Each output line is ``{"index", "id", "worker_pid", "text", "token_ids", "finish_reason",
"timings", "error"}`` (``index``: the prompt's position among the input's prompts;
``worker_pid``: the process that generated it; ``timings``: the engine's, per prompt).
Generation is greedy unless a temperature is given; a sampled prompt's seed is ``seed + index``,
so a prompt's output never depends on which worker ran it.

Workers each load the model once: in this process (one worker), in a process pool (several), or
as Ray actors. Prompts are sharded over the workers; a Ray actor that dies is restarted and its
unfinished prompts run again, a pool worker that dies has its prompts retried.

Results are appended to the output file as they complete, in input order, and flushed: a rerun
over the same output file skips the prompts it already holds (an error row is retried) and, when
it is done, rewrites the file in input order if the rerun left it out of order.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from workbench.engine import distribute
from workbench.errors import UserError, WorkbenchError

DEFAULT_MAX_TOKENS = 128


@dataclass(frozen=True)
class PromptItem:
    index: int  # position among the input's prompts (blank lines are not prompts)
    id: str
    prompt: str | None = None
    messages: tuple[tuple[tuple[str, str], ...], ...] | None = None  # hashable chat
    max_tokens: int | None = None


@dataclass(frozen=True)
class EngineSpec:
    """What a worker needs to build its engine (picklable; one engine per worker process)."""

    model: str  # a GGUF path (resolved in the caller: workers never download)
    backend: str = "numpy"
    threads: int | None = None


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int = 0


def read_prompts(path: str | os.PathLike[str]) -> list[PromptItem]:
    """The prompts of a JSONL file; `UserError` naming the line of a bad one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError("user.no_prompts_file", f"no prompts file {os.fspath(path)!r}") from None
    items: list[PromptItem] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{os.fspath(path)}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError("user.bad_prompts", f"{where}: not JSON ({e.msg})") from None
        items.append(_prompt_item(obj, len(items), lineno, where))
    if not items:
        raise UserError("user.bad_prompts", f"{os.fspath(path)} holds no prompts")
    return items


def _prompt_item(obj: Any, index: int, lineno: int, where: str) -> PromptItem:
    if not isinstance(obj, dict):
        raise UserError("user.bad_prompts", f"{where}: each line is a JSON object")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise UserError("user.bad_prompts", f"{where}: give exactly one of prompt or messages")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise UserError("user.bad_prompts", f"{where}: prompt must be a non-empty string")
    chat = None
    if messages is not None:
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages
        )  # fmt: skip
        if not ok:
            raise UserError(
                "user.bad_prompts",
                f"{where}: messages must be a non-empty list of {{role, content}} strings",
            )
        chat = tuple(tuple((k, m[k]) for k in ("role", "content")) for m in messages)
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise UserError("user.bad_prompts", f"{where}: max_tokens must be an integer >= 1")
    return PromptItem(index, str(obj.get("id", lineno)), prompt, chat, max_tokens)


# --- one worker ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _engine(spec: EngineSpec) -> Any:
    """This process's engine (loaded on its first prompt, then reused), warmed up so that no
    prompt's timings include compiling the kernels."""
    from workbench.engine.generate import Engine

    engine = Engine(spec.model, backend=spec.backend, threads=spec.threads)
    engine.warm_up()
    return engine


def generate_one(engine: Any, item: PromptItem, sampling: SamplingSpec) -> dict[str, Any]:
    """One prompt's output record. A prompt the engine refuses (too long, say) is a record with
    ``error`` set; other failures raise (the job is retried)."""
    from workbench.engine.generate import GenerationConfig

    config = GenerationConfig(
        max_tokens=item.max_tokens or sampling.max_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        seed=sampling.seed + item.index,
    )
    record: dict[str, Any] = {"index": item.index, "id": item.id, "worker_pid": os.getpid()}
    try:
        if item.messages is not None:
            gen = engine.chat([dict(m) for m in item.messages], config)
        else:
            gen = engine.generate(item.prompt, config)
        result = gen.run()
    except WorkbenchError as e:
        if e.category not in ("user", "model"):
            raise
        return {**record, "text": None, "token_ids": None, "finish_reason": None,
                "timings": None, "error": distribute.describe(e)}  # fmt: skip
    return {
        **record,
        "text": result.text,
        "token_ids": list(result.token_ids),
        "finish_reason": result.finish_reason,
        "timings": result.timings.to_dict(),
        "error": None,
    }


def pool_job(job: tuple[EngineSpec, SamplingSpec, PromptItem]) -> dict[str, Any]:
    """A local worker's job: the process's engine (loaded once) on one prompt."""
    spec, sampling, item = job
    return generate_one(_engine(spec), item, sampling)


class EvalWorker:
    """A Ray actor's body: loads the model once, then generates prompt after prompt."""

    def __init__(self, spec: EngineSpec) -> None:
        self.engine = _engine(spec)

    def generate(
        self, item: PromptItem, sampling: SamplingSpec, trace_carrier: dict | None = None
    ) -> dict[str, Any]:
        return distribute.call_job(lambda it: generate_one(self.engine, it, sampling), item,
                                   trace_carrier)  # fmt: skip

    def pid(self) -> int:
        return os.getpid()


# --- the run -------------------------------------------------------------------------------------


def load_done(path: Path, items: Sequence[PromptItem]) -> dict[int, dict[str, Any]]:
    """The records of ``path`` (an earlier run's output) that answer one of ``items`` without an
    error; a torn last line (the run was killed while writing it) is dropped."""
    if not path.exists():
        return {}
    done: dict[int, dict[str, Any]] = {}
    ids = {it.index: it.id for it in items}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (
            isinstance(rec, dict)
            and isinstance(rec.get("index"), int)
            and ids.get(rec["index"]) == rec.get("id")
            and rec.get("error") is None
        ):
            done[rec["index"]] = rec
    return done


@dataclass(frozen=True)
class EvalSummary:
    total: int
    skipped: int  # already in the output file
    generated: int
    failed: int
    output: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_eval(
    prompts: str | os.PathLike[str] | Sequence[PromptItem],
    output: str | os.PathLike[str],
    model: str | os.PathLike[str] | None = None,
    *,
    backend: str = "numpy",
    threads: int | None = None,
    sampling: SamplingSpec = SamplingSpec(),
    workers: int = 1,
    ray: bool = False,
    ray_address: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_workers: Callable[[list[Any]], None] | None = None,
    trace_carrier: dict | None = None,
) -> EvalSummary:
    """Generate a completion for each prompt not yet in ``output`` and append it there, in input
    order. ``workers`` processes (1: this one), or as many Ray actors with ``ray``.
    ``on_workers(actors)`` receives the Ray actor handles once they exist (for tests and tools
    that watch them); ``progress(done, total)`` counts the prompts to generate."""
    from workbench import store

    distribute.check_workers(workers)
    items = list(prompts) if not isinstance(prompts, (str, os.PathLike)) else read_prompts(prompts)
    out = Path(output)
    done = load_done(out, items)
    todo = [it for it in items if it.index not in done]
    path = str(store.resolve(model, store.default_home()))  # pulled once, here
    if threads is None and not ray and workers > 1:
        threads = max(1, distribute.cpu_count() // workers)
    spec = EngineSpec(path, backend, threads)
    _rewrite(out, items, done)  # drop torn lines and stale error rows before appending
    failed = 0
    attributes = {"workbench.eval.prompts": len(items), "workbench.eval.todo": len(todo),
                  "workbench.eval.workers": workers, "workbench.eval.ray": ray}  # fmt: skip
    with (
        distribute.traced_run("workbench.eval", attributes, trace_carrier) as carrier,
        out.open("a", encoding="utf-8") as f,
    ):
        for rec in _generate(spec, sampling, todo, workers, ray, ray_address, progress,
                             on_workers, carrier):  # fmt: skip
            failed += rec["error"] is not None
            f.write(json.dumps(rec) + "\n")
            f.flush()
            done[rec["index"]] = rec
    return EvalSummary(len(items), len(items) - len(todo), len(todo), failed, str(out))


def _rewrite(out: Path, items: Sequence[PromptItem], done: Mapping[int, dict]) -> None:
    """Write ``done``'s records in input order when the file holds anything else (a torn line,
    an error row to redo, records out of order); atomic (a temporary file renamed over it)."""
    if not out.exists():
        return
    want = [json.dumps(done[it.index]) for it in items if it.index in done]
    if out.read_text(encoding="utf-8").splitlines() == want:
        return
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in want), encoding="utf-8")
    os.replace(tmp, out)


def _generate(spec, sampling, todo, workers, ray, ray_address, progress, on_workers, carrier):
    if not todo:
        return
    if ray:
        yield from _generate_ray(spec, sampling, todo, workers, ray_address, progress,
                                 on_workers, carrier)  # fmt: skip
        return
    jobs = [(spec, sampling, it) for it in todo]
    outcomes = distribute.run_jobs(
        pool_job, jobs, workers=workers, progress=progress, trace_carrier=carrier
    )
    for it, o in zip(todo, outcomes):
        yield o.value if o.ok else _error_record(it, o.error, o.attempts)


def _error_record(item: PromptItem, error: str | None, attempts: int) -> dict[str, Any]:
    return {"index": item.index, "id": item.id, "worker_pid": None, "text": None, "token_ids": None,
            "finish_reason": None, "timings": None,
            "error": f"{error} (after {attempts} attempts)"}  # fmt: skip


# A killed actor is restarted this many times, and a call it was running or had queued is
# retried as often: enough for a node lost mid-run, not a loop over a prompt that kills it.
ACTOR_RESTARTS = 3


def _generate_ray(spec, sampling, todo, workers, address, progress, on_workers, carrier):
    ray = distribute.ray_init(address)
    actor_cls = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)(EvalWorker)
    actors = [actor_cls.remote(spec) for _ in range(min(workers, len(todo)))]
    if on_workers is not None:
        on_workers(actors)
    # Shards: prompt k of the remaining ones goes to actor k mod n (queued there in order).
    refs = [actors[k % len(actors)].generate.remote(it, sampling, carrier)
            for k, it in enumerate(todo)]  # fmt: skip
    yield from _gather_ordered(ray, refs, todo, progress)
    for a in actors:
        ray.kill(a)


def _gather_ordered(ray, refs, todo, progress) -> Iterator[dict[str, Any]]:
    index = {ref: k for k, ref in enumerate(refs)}
    results: dict[int, dict[str, Any]] = {}
    remaining, next_out, finished = list(refs), 0, 0
    while next_out < len(refs):
        ready, remaining = ray.wait(remaining, num_returns=1)
        for ref in ready:
            k = index[ref]
            try:
                results[k] = ray.get(ref)
            except Exception as e:  # the actor died more often than it may restart
                cause = getattr(e, "cause", None) or e
                results[k] = _error_record(todo[k], distribute.describe(cause), ACTOR_RESTARTS)
            finished += 1
            if progress is not None:
                progress(finished, len(refs))
        while next_out in results:
            yield results.pop(next_out)
            next_out += 1
