"""Record what one decode token launches on the device backend, with the emulator's counters.

`record_decode` opens a GGUF model, keeps one representative of each kind of layer (layers whose
tensors have the same names, types and shapes launch the same kernels at the same shapes, so
their counters are equal; the first layer, which also runs the embedding's RMSNorm, is a kind of
its own: SmolLM2's 30 layers are two kinds, 1 + 29), fills the KV cache's length to
``position`` and runs one `Transformer.decode_one_token` plus the greedy pick through the device
backend on the CPU emulator, every module built with memory counters for a GPU target. Each
launch is recorded with the backend operation ("role") that made it, the layer it belongs to and
its counter totals; each operation with the bytes it must move at least (`ideal_bytes`). The
offline compiler's resources (VGPRs, occupancy) of every launched kernel are added when the
compiler is installed. The result is plain JSON-ready data; `decode_report` presents it.

This file also runs as a script in a tree exported from another revision (`decode_report`'s
``rev``): then ``workbench`` is that revision's package, its kernels driven by its own launch
code. It therefore uses only what every revision since the instrumented emulator offers:
`DeviceBackend`, `Transformer`, `read_gguf`, `EmulatorModule(counters=, target=)` and
`toolchain.compile_source`; it hooks the emulator module class rather than changing the backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

# progress(phase, done, total, what): phase "build" (emulator modules), "decode" (launches, total
# unknown: 0), "resources" (offline compiles)
Progress = Callable[[str, int, int, str], None]

# Backend methods that are not operations of a forward pass.
NOT_OPERATIONS = frozenset({"load_weight", "to_host", "synchronize", "free_memory", "memory"})
MODEL_SECTION = "model"  # operations outside the layers (embedding, output head, sampling)


# --- the ideal ------------------------------------------------------------------------------------
# What an operation must move at least: every input it needs read once, every output written
# once. The default counts each array argument (a weight's blocks, an activation, a KV cache
# holding exactly the positions attended: the recording sizes the cache so) and the result.
# Operations that touch only part of an argument, or write in place, have their own rule here.


def _is_weight(v: Any) -> bool:
    return hasattr(v, "qtype") and hasattr(v, "data") and isinstance(getattr(v, "name", None), str)


def _arrays(values: Any) -> list[Any]:
    """The arrays among ``values``: a weight's blocks, an activation as the next product reads it
    (its Q8_1 codes where it has them, else its floats), the members of a tuple of results."""
    out = []
    for v in values:
        if isinstance(v, (tuple, list)):
            out += _arrays(v)
            continue
        if _is_weight(v):
            v = v.data
        elif hasattr(v, "h") and hasattr(v, "xq"):  # the device backend's Activation
            v = v.h if v.xq is None else v.xq
        if hasattr(v, "nbytes") and hasattr(v, "dtype") and hasattr(v, "shape"):
            out.append(v)
    return out


def _default_ideal(args: tuple, kwargs: dict, result: Any) -> int:
    seen: dict[int, int] = {}
    for a in _arrays([*args, *kwargs.values()]):
        seen[id(a)] = int(a.nbytes)
    return sum(seen.values()) + sum(int(a.nbytes) for a in _arrays([result]))


def _embed_ideal(args: tuple, kwargs: dict, result: Any) -> int:
    w, ids = args[0], np.asarray(args[1])
    row = int(w.data.nbytes) // int(w.shape[0])  # one row of blocks per looked-up token
    return ids.size * (row + 4) + sum(int(a.nbytes) for a in _arrays([result]))


def _rope_ideal(args: tuple, kwargs: dict, result: Any) -> int:
    return 2 * int(args[0].nbytes)  # x rotated in place: read and written


def _kv_append_ideal(args: tuple, kwargs: dict, result: Any) -> int:
    k_cache, k, v = args[0], args[2], args[3]
    new = int(k.size + v.size)  # this token's keys and values: read, then written to the cache
    return int(k.nbytes + v.nbytes) + new * k_cache.dtype.itemsize


def _rope_kv_ideal(args: tuple, kwargs: dict, result: Any) -> int:
    q, k, v, k_cache = args[0], args[1], args[2], args[3]
    new = int(k.size + v.size)  # rotated k and v written at one position of the cache
    return int(q.nbytes + k.nbytes + v.nbytes) + int(result.nbytes) + new * k_cache.dtype.itemsize


IDEAL_RULES: dict[str, Callable[[tuple, dict, Any], int]] = {
    "embed": _embed_ideal,
    "rope": _rope_ideal,
    "kv_append": _kv_append_ideal,
    "rope_kv": _rope_kv_ideal,
}


def ideal_bytes(op: str, args: tuple, kwargs: dict, result: Any) -> int:
    """The bytes operation ``op`` must move at least, from its arguments and result."""
    return IDEAL_RULES.get(op, _default_ideal)(args, kwargs, result)


# --- recording ------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.active = False
        self.section = MODEL_SECTION
        self.calls: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None
        self._launches = 0

    def begin(self, op: str, args: tuple) -> None:
        weight = next((a for a in args if _is_weight(a)), None)
        role = op
        if weight is not None:
            parts = weight.name.split(".")
            if parts[0] == "blk" and len(parts) > 2:
                self.section, role = f"layer {parts[1]}", f"{op} {parts[2]}"
            else:
                self.section, role = MODEL_SECTION, f"{op} {parts[0]}"
        same = sum(1 for c in self.calls if c["section"] == self.section and c["op_role"] == role)
        self._current = {
            "op": op,
            "op_role": role,
            "role": role if not same else f"{role} #{same + 1}",
            "section": self.section,
            "launches": [],
        }

    def end(self, op: str, args: tuple, kwargs: dict, result: Any) -> None:
        assert self._current is not None
        self._current["ideal_bytes"] = ideal_bytes(op, args, kwargs, result)
        self.calls.append(self._current)
        self._current = None

    def launch(self, module: Any, symbol: str, grid: Any, block: Any, report: Any) -> None:
        if self._current is None:  # a launch outside any operation: its own row
            self.begin("other", ())
            self._current["ideal_bytes"] = 0
        totals = dict(report.totals) if report is not None else {}
        self._current["launches"].append({
            "symbol": symbol,
            "source": str(module.source),
            "options": list(getattr(module, "wb_options", ())),
            "grid": [int(g) for g in grid],
            "block": [int(b) for b in block],
            "totals": {k: float(v) for k, v in totals.items()},
        })  # fmt: skip
        self._launches += 1
        if self.progress is not None:
            self.progress("decode", self._launches, 0, symbol)


class _RecordedKernel:
    def __init__(self, kernel: Any, module: Any, symbol: str, recorder: _Recorder) -> None:
        self._kernel, self._module, self._symbol, self._recorder = kernel, module, symbol, recorder

    def __call__(self, grid: Any, block: Any, args: Any, shared_mem: int = 0) -> Any:
        out = self._kernel(grid, block, args, shared_mem=shared_mem)
        if self._recorder.active:
            report = getattr(self._kernel, "last_report", None)
            self._recorder.launch(self._module, self._symbol, grid, block, report)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kernel, name)


@contextlib.contextmanager
def _counted_modules(target: str, recorder: _Recorder) -> Iterator[None]:
    """Every `EmulatorModule` built meanwhile counts memory traffic for ``target`` and records
    its launches (the backend and the launch wrappers import the class when they build)."""
    from workbench.kernels import emulator

    base = emulator.EmulatorModule

    class CountedModule(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(counters=True, target=target)
            super().__init__(*args, **kwargs)
            self.wb_options = tuple(kwargs.get("options", ()))

        def get_function(self, name: str) -> Any:
            return _RecordedKernel(super().get_function(name), self, name, recorder)

    emulator.EmulatorModule = CountedModule
    try:
        yield
    finally:
        emulator.EmulatorModule = base


class _RecordingBackend:
    """The backend, with each operation's call noted (role, layer, ideal bytes) while recording."""

    def __init__(self, backend: Any, recorder: _Recorder) -> None:
        self._backend, self._recorder = backend, recorder

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._backend, name)
        if name.startswith("_") or name in NOT_OPERATIONS or not callable(attr):
            return attr
        rec = self._recorder

        def operation(*args: Any, **kwargs: Any) -> Any:
            if not rec.active:
                return attr(*args, **kwargs)
            rec.begin(name, args)
            result = attr(*args, **kwargs)
            rec.end(name, args, kwargs, result)
            return result

        return operation


def layer_kinds(tensors: dict[str, Any], n_layers: int) -> list[tuple[int, int]]:
    """(representative layer, how many layers are of its kind), in order of first appearance:
    layers of one kind have tensors of the same names, types and shapes. The first layer is a
    kind of its own: the fused decode step runs its RMSNorm as a launch of its own, where each
    later layer's comes with the previous layer's last product (8 launches against 7)."""
    kinds: dict[tuple, list[int]] = {}
    for i in range(n_layers):
        prefix = f"blk.{i}."
        sig = (i == 0, *sorted(
            (k[len(prefix):], int(t.qtype), tuple(t.shape))
            for k, t in tensors.items() if k.startswith(prefix)
        ))  # fmt: skip
        kinds.setdefault(sig, []).append(i)
    return [(idx[0], len(idx)) for idx in kinds.values()]


def _reduced_model(model: Any, kinds: list[tuple[int, int]]) -> Any:
    """The model with only the representative layers, renumbered 0..; the other tensors kept."""
    tensors = {k: t for k, t in model.tensors.items() if not k.startswith("blk.")}
    for j, (i, _) in enumerate(kinds):
        prefix = f"blk.{i}."
        for k, t in model.tensors.items():
            if k.startswith(prefix):
                name = f"blk.{j}.{k[len(prefix) :]}"
                tensors[name] = dataclasses.replace(t, name=name)
    spec = dataclasses.replace(model.spec, n_layers=len(kinds))
    return dataclasses.replace(model, spec=spec, tensors=tensors)


def kernel_resources(
    launches: list[dict[str, Any]], arch: str, progress: Progress | None = None
) -> dict[str, Any]:
    """The offline compiler's resources of each launched kernel on ``arch``: {"arch", "note",
    "kernels": {symbol: {"vgprs", "occupancy", "lds_bytes", ...} | None}}. "note" says why
    there are none (no compiler, a failed build)."""
    from workbench.errors import BackendError
    from workbench.kernels import toolchain

    out: dict[str, Any] = {"arch": arch, "note": "", "kernels": {}}
    try:
        toolchain.compiler_for(arch)
    except BackendError as e:
        out["note"] = f"n/a: {e.message}"
        return out
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for launch in launches:
        key = (launch["source"], tuple(launch["options"]))
        groups.setdefault(key, [])
        if launch["symbol"] not in groups[key]:
            groups[key].append(launch["symbol"])
    failed = []
    for i, ((source, options), symbols) in enumerate(groups.items()):
        if progress is not None:
            progress("resources", i, len(groups), Path(source).name)
        try:
            result = toolchain.compile_source(source, arch, options=options, symbols=symbols)
        except BackendError as e:
            failed.append(f"{Path(source).name}: {e.code}")
            out["kernels"].update(dict.fromkeys(symbols))
            continue
        for sym in symbols:
            try:
                out["kernels"][sym] = dataclasses.asdict(result.resources(sym))
            except BackendError:
                out["kernels"][sym] = None
    if progress is not None:
        progress("resources", len(groups), len(groups), "")
    if failed:
        out["note"] = "build failed: " + ", ".join(failed)
    return out


def record_decode(
    model_path: str | Path,
    *,
    position: int,
    target: str,
    warp_size: int,
    resources_arch: str | None = None,
    every_layer: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """One decode token at ``position`` (tokens already in the cache) through the device backend
    on the emulator, counted for GPU ``target`` with warps of ``warp_size``; see the module doc.
    ``resources_arch``: the target of the offline compiler's resource report (None: none).
    ``every_layer`` runs every layer instead of one per kind (slower; it checks the method)."""
    from workbench.backends.device import DeviceBackend
    from workbench.engine.model import Transformer
    from workbench.errors import UserError
    from workbench.gguf.reader import read_gguf

    model = read_gguf(model_path)
    spec = model.spec
    if spec is None:
        raise UserError("user.bad_model", f"{model_path} holds no model (vocabulary only?)")
    if not 0 <= position < spec.context_length:
        raise UserError(
            "user.bad_argument",
            f"position {position} is outside the model's context of {spec.context_length}",
        )
    kinds = (
        [(i, 1) for i in range(spec.n_layers)]
        if every_layer
        else layer_kinds(model.tensors, spec.n_layers)
    )
    recorder = _Recorder(progress)

    def built(done: int, total: int, source: str) -> None:
        if progress is not None:
            progress("build", done, total, source)

    with _counted_modules(target, recorder):
        backend = DeviceBackend("emulator", warp_size=warp_size, progress=built)
        net = Transformer(_reduced_model(model, kinds), _RecordingBackend(backend, recorder))
        # The cache holds exactly the positions this token attends to, so that a cache argument's
        # size is what attention must read (`ideal_bytes`).
        cache = net.new_cache(capacity=position + 1)
        cache.length = position
        token = int(spec.vocab_size // 2)
        recorder.active = True
        logits = net.decode_one_token(token, cache)
        net.backend.sample_token(logits, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, u=0.0)
        recorder.active = False

    layers = {f"layer {j}": {"index": i, "count": c} for j, (i, c) in enumerate(kinds)}
    launches = [launch for call in recorder.calls for launch in call["launches"]]
    resources = (
        kernel_resources(launches, resources_arch, progress)
        if resources_arch
        else {"arch": None, "note": "skipped", "kernels": {}}
    )
    return {
        "model": spec.name,
        "model_path": str(model_path),
        "spec": dataclasses.asdict(spec),
        "position": position,
        "target": target,
        "warp_size": warp_size,
        "kv_dtype": str(np.dtype(getattr(backend, "kv_dtype", np.float32))),
        "layers": layers,
        "calls": recorder.calls,
        "resources": resources,
    }


PROGRESS_PREFIX = "WB-PROGRESS "


def _main(argv: list[str]) -> int:
    """Script entry (``decode_report`` runs it in an exported tree): argv[0] is a JSON object of
    `record_decode`'s arguments plus "out", the file the JSON result is written to. Progress goes
    to stderr as lines starting with PROGRESS_PREFIX."""
    params = json.loads(argv[0])
    out = Path(params.pop("out"))

    def progress(phase: str, done: int, total: int, what: str) -> None:
        sys.stderr.write(PROGRESS_PREFIX + json.dumps([phase, done, total, what]) + "\n")
        sys.stderr.flush()

    result = record_decode(params.pop("model_path"), progress=progress, **params)
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
