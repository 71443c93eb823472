"""Fault injection: make the real call sites fail on purpose, for demos and tests.

A spec names sites and how often each fails: ``"launch:0.05,alloc:0.01,compile:once"``. A mode is
a rate in [0, 1], ``once`` (the first check fails), ``always`` or ``never``. Each site draws from
its own RNG seeded from (seed, site), so adding a site does not change another's sequence. The
raised errors are the ones a real device raises at that site (see `SITE_ERRORS`), with
``injected=True`` in their context.

Library code calls the module-level `maybe_fail` at its call sites; it does nothing (one dict
lookup) until the edge (CLI, server) installs an injector, usually `FaultInjector.from_env`.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from workbench.errors import RecoverableError, UserError

FAULTS_ENV = "WORKBENCH_FAULTS"
SEED_ENV = "WORKBENCH_FAULTS_SEED"

# site -> (code, message) of the RecoverableError raised there; one place for these facts.
SITE_ERRORS: dict[str, tuple[str, str]] = {
    "launch": ("device.launch_failed", "kernel launch failed"),
    "sync": ("device.sync_failed", "device synchronisation failed"),
    "alloc": ("device.out_of_memory", "device out of memory"),
    "compile": ("backend.compile_transient", "kernel compiler failed transiently"),
    "download": ("model.download_failed", "model download failed"),
}
SITES = tuple(SITE_ERRORS)
MODES = ("once", "always", "never")


def _bad(message: str, **context: Any) -> UserError:
    return UserError("user.bad_faults", message, **context)


def _check_site(site: str) -> None:
    if site not in SITE_ERRORS:
        raise _bad(f"unknown fault site {site!r}; sites are {', '.join(SITES)}", site=site)


def _parse_mode(site: str, mode: float | str) -> float | str:
    """A rate in [0, 1] or one of `MODES`; strings that read as numbers are rates."""
    if isinstance(mode, str):
        text = mode.strip().lower()
        if text in MODES:
            return text
        try:
            rate = float(text)
        except ValueError:
            raise _bad(
                f"fault mode for {site!r} must be a rate in [0, 1] or one of {', '.join(MODES)}, "
                f"not {mode!r}",
                site=site,
            ) from None
    elif isinstance(mode, bool) or not isinstance(mode, (int, float)):
        raise _bad(f"fault mode for {site!r} must be a number or a string, not {mode!r}")
    else:
        rate = float(mode)
    if not math.isfinite(rate) or not 0.0 <= rate <= 1.0:
        raise _bad(f"fault rate for {site!r} must be in [0, 1], not {mode!r}", site=site)
    return rate


def _parse_seed(seed: int | str | None) -> int:
    if seed is None:
        return 0
    if isinstance(seed, str):
        try:
            return int(seed.strip())
        except ValueError:
            raise _bad(f"fault seed must be an integer, not {seed!r}") from None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _bad(f"fault seed must be an integer, not {seed!r}")
    return seed


class FaultInjector:
    """Per-site fault modes, seeded RNGs and counts; thread-safe."""

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = _parse_seed(seed)
        self._lock = threading.Lock()
        self._modes: dict[str, float | str] = {}
        self._rngs: dict[str, random.Random] = {}
        self._checks = dict.fromkeys(SITES, 0)
        self._injected = dict.fromkeys(SITES, 0)
        self._fired: set[str] = set()  # "once" sites that have failed since their `set`

    @classmethod
    def from_spec(cls, spec: str, *, seed: int | str | None = 0) -> FaultInjector:
        """Parse ``"site:mode,site:mode"``; an empty spec gives an injector that never fails."""
        if not isinstance(spec, str):
            raise _bad(f"a fault spec is a string like 'launch:0.05,alloc:once', not {spec!r}")
        inj = cls(seed=_parse_seed(seed))
        seen: set[str] = set()
        for item in (part.strip() for part in spec.split(",")) if spec.strip() else ():
            site, sep, mode = item.partition(":")
            site = site.strip().lower()
            if not sep or not site or not mode.strip():
                raise _bad(
                    f"malformed fault spec item {item!r} in {spec!r}: expected site:mode, e.g. "
                    "'launch:0.05' or 'compile:once'",
                    spec=spec,
                )
            if site in seen:
                raise _bad(f"fault site {site!r} given twice in {spec!r}", spec=spec)
            seen.add(site)
            inj.set(site, mode)
        return inj

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FaultInjector:
        """From ``WORKBENCH_FAULTS`` and ``WORKBENCH_FAULTS_SEED`` (default 0); edge code only."""
        return cls.from_spec(environ.get(FAULTS_ENV, ""), seed=environ.get(SEED_ENV) or 0)

    def set(self, site: str, mode: float | str) -> None:
        """Set ``site``'s mode (a rate in [0, 1], "once", "always" or "never"); restarts its RNG
        and re-arms "once"."""
        _check_site(site)
        parsed = _parse_mode(site, mode)
        with self._lock:
            if parsed == "never" or parsed == 0.0:
                self._modes.pop(site, None)
            else:
                self._modes[site] = parsed
            self._rngs[site] = random.Random(f"{self.seed}:{site}")
            self._fired.discard(site)

    @property
    def enabled(self) -> bool:
        return bool(self._modes)

    def modes(self) -> dict[str, float | str]:
        with self._lock:
            return dict(self._modes)

    def spec(self) -> str:
        """The active modes as a spec string (`from_spec` reads it back)."""
        return ",".join(f"{s}:{m}" for s, m in self.modes().items())

    def should_fail(self, site: str) -> bool:
        """Draw for one check of ``site`` (counted); True when this check is to fail."""
        _check_site(site)
        with self._lock:
            self._checks[site] += 1
            mode = self._modes.get(site)
            if mode is None:
                return False
            if mode == "always":
                fail = True
            elif mode == "once":
                fail = site not in self._fired
                self._fired.add(site)
            else:
                fail = self._rngs[site].random() < mode
            if fail:
                self._injected[site] += 1
            return fail

    def maybe_fail(self, site: str, **context: Any) -> None:
        """Raise the site's error (`SITE_ERRORS`) when this check is to fail."""
        if self.should_fail(site):
            raise make_error(site, **context)

    def injected(self, site: str) -> int:
        """Faults injected so far at ``site``."""
        _check_site(site)
        with self._lock:
            return self._injected[site]

    def counts(self) -> dict[str, int]:
        """Faults injected so far, per site."""
        with self._lock:
            return dict(self._injected)

    def checks(self) -> dict[str, int]:
        """Checks made so far per site (failed or not)."""
        with self._lock:
            return dict(self._checks)

    def reset_counts(self) -> None:
        with self._lock:
            self._checks = dict.fromkeys(SITES, 0)
            self._injected = dict.fromkeys(SITES, 0)


def make_error(site: str, **context: Any) -> RecoverableError:
    """The error an injected fault at ``site`` raises."""
    _check_site(site)
    code, message = SITE_ERRORS[site]
    where = f" ({context['kernel']})" if context.get("kernel") else ""
    return RecoverableError(
        code, f"{message}{where} [injected fault]", **{**context, "site": site, "injected": True}
    )


# -- the process-wide injector -----------------------------------------------------------------

_default = FaultInjector()


def default_injector() -> FaultInjector:
    return _default


def install(injector: FaultInjector | None) -> FaultInjector:
    """Make ``injector`` the process-wide one (None: a disabled one); return the previous."""
    global _default
    if injector is not None and not isinstance(injector, FaultInjector):
        raise _bad(f"install takes a FaultInjector or None, not {type(injector).__name__}")
    previous, _default = _default, injector or FaultInjector()
    return previous


@contextlib.contextmanager
def injecting(injector: FaultInjector) -> Iterator[FaultInjector]:
    """Install ``injector`` for the duration of a ``with`` block (tests, demos)."""
    previous = install(injector)
    try:
        yield injector
    finally:
        install(previous)


def maybe_fail(site: str, **context: Any) -> None:
    """Check ``site`` against the process-wide injector; cheap when none is configured."""
    inj = _default
    if not inj._modes:
        if site not in SITE_ERRORS:
            _check_site(site)
        return
    inj.maybe_fail(site, **context)
