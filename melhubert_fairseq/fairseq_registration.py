"""Registering the plugin with fairseq as soon as fairseq is imported, without importing fairseq first.

Importing :mod:`melhubert_fairseq` must stay cheap (the data tools and every ``--help`` never need fairseq
or torch), yet a process that imports the package and later fairseq (``import melhubert_fairseq`` and then
``checkpoint_utils.load_model_ensemble_and_task``) must find the task, model and criterion registered.
:func:`register_when_fairseq_is_imported` waits for that import with a finder on ``sys.meta_path``
that finds nothing itself: it only wraps the loaders of ``fairseq`` and of this package's modules.

Registration runs once fairseq is loaded *and* no module of the plugin is half-imported: fairseq's
first import often comes from inside a plugin module (``models/components.py`` imports
``fairseq.modules`` on its first lines), and registering there would import the rest of the plugin
while that module is still incomplete. The finder counts plugin modules being executed and registers
when the outermost of them has finished.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from typing import Callable, Optional

PACKAGE = __name__.rpartition(".")[0]


class _RegisterAfterFairseqImport(importlib.abc.MetaPathFinder):
    """Calls ``register`` once fairseq has been imported and no plugin module is being executed."""

    def __init__(self, register: Callable[[], None]) -> None:
        self._register = register
        self._lock = threading.Lock()
        self._plugin_modules_running = 0
        self._fairseq_loaded = False
        self._done = False
        self._searching = threading.local()  # our own find_spec call must not see this finder again

    def find_spec(self, fullname: str, path=None, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        """The spec the other finders give for ``fairseq`` or a plugin module, its loader wrapped; else None."""
        is_fairseq = fullname == "fairseq"
        if not (is_fairseq or fullname.startswith(PACKAGE + ".")) or getattr(self._searching, "active", False):
            return None
        self._searching.active = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching.active = False
        # Only file loaders are per-module objects whose exec_module can be wrapped on the instance.
        if spec is not None and isinstance(spec.loader, importlib.abc.FileLoader):
            self._wrap(spec.loader, is_fairseq)
        return spec

    def _wrap(self, loader: importlib.abc.FileLoader, is_fairseq: bool) -> None:
        """Make ``loader.exec_module`` report to this finder when it starts and ends."""
        run = loader.exec_module

        def exec_module(module) -> None:
            if is_fairseq:
                run(module)  # a failed import of fairseq registers nothing
                with self._lock:
                    self._fairseq_loaded = True
            else:
                with self._lock:
                    self._plugin_modules_running += 1
                try:
                    run(module)
                finally:
                    with self._lock:
                        self._plugin_modules_running -= 1
            self._register_if_ready()

        loader.exec_module = exec_module

    def _register_if_ready(self) -> None:
        """Register (once, and remove this finder) when fairseq is loaded and no plugin module is running."""
        with self._lock:
            if self._done or not self._fairseq_loaded or self._plugin_modules_running:
                return
            self._done = True
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self._register()


def register_when_fairseq_is_imported(register: Callable[[], None]) -> None:
    """Run ``register`` right after fairseq is first imported (or at the end of the plugin module whose
    import pulled fairseq in); a no-op once it has run."""
    if not any(isinstance(finder, _RegisterAfterFairseqImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterFairseqImport(register))
