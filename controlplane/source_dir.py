"""A watched directory of YAML resources → mesh state.

Polls the directory's ``*.yaml``/``*.yml`` files (mtime, size, inode) every ``interval``
seconds and re-parses the ones that changed. A file that fails to parse is reported (logged,
and kept in :attr:`DirectorySource.errors` for the admin endpoint) and its last good
resources keep being served, so a half-saved edit never empties the mesh. A new state is
published only when its content changed; its version is one more than the last.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import trio

from controlplane import resources as res
from controlplane.translate import is_news, translate
from nodeproxy import model

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml")

Stamp = tuple[int, int, int]  # (mtime_ns, size, inode)


def initial_version() -> int:
    """Versions start from the clock (ms) so a restarted control plane never reuses one a
    client already holds; after that they count up by one per change."""
    return int(time.time() * 1000)


class DirectorySource:
    def __init__(
        self,
        directory: Path,
        publish: Callable[[model.MeshState], None],
        *,
        trust_domain: str = model.TRUST_DOMAIN,
        interval: float = 0.5,
        version: int | None = None,
    ):
        self.directory = Path(directory)
        self.publish = publish
        self.trust_domain = trust_domain
        self.interval = interval
        self.version = initial_version() if version is None else version
        self.state: model.MeshState | None = None
        # path → reason; the directory itself appears here when it cannot be listed
        self.errors: dict[str, str] = {}
        self._stamps: dict[str, Stamp] = {}
        self._good: dict[str, list[res.Resource]] = {}  # last good resources per file

    @property
    def resources(self) -> list[res.Resource]:
        """Every resource currently served, in file-name order."""
        return [r for path in sorted(self._good) for r in self._good[path]]

    def scan(self) -> model.MeshState | None:
        """Look for changes once; return the new state when it changed (not yet published).

        Blocking file IO: ``run`` calls it on a worker thread and publishes from trio.
        """
        changed = self._reload()
        if not changed and self.state is not None:
            return None
        new = translate(self.resources, version=self.version + 1, trust_domain=self.trust_domain)
        if not is_news(self.state, new):
            return None
        self.version += 1
        self.state = new
        return new

    def _reload(self) -> bool:
        """Re-read changed files; True when the served resources may have changed."""
        key = str(self.directory)
        try:
            entries = {
                str(p): p.stat()
                for p in self.directory.iterdir()
                if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file()
            }
        except OSError as e:
            # keep serving what we had: a directory briefly gone (remount, rename) must not
            # empty the mesh
            if self.errors.get(key) != str(e):
                log.error("cannot list resource directory %s: %s", self.directory, e)
            self.errors[key] = f"cannot list directory: {e}"
            return False
        self.errors.pop(key, None)
        changed = False
        for path in [p for p in self._stamps if p not in entries]:
            log.info("resource file %s removed", path)
            self._stamps.pop(path)
            self.errors.pop(path, None)
            changed |= self._good.pop(path, None) is not None
        for path, st in sorted(entries.items()):
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._stamps.get(path) == stamp:
                continue
            self._stamps[path] = stamp
            try:
                parsed = res.parse_file(Path(path))
            except res.ResourceError as e:
                kept = len(self._good.get(path, []))
                log.error("%s (keeping the last good version: %d resources)", e, kept)
                self.errors[path] = str(e)
                continue
            if path in self.errors:
                log.info("resource file %s is valid again", path)
            self.errors.pop(path, None)
            self._good[path] = parsed
            changed = True
        return changed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Scan now (the first state is published before ``started``), then poll forever."""
        await self._scan_and_publish()
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            try:
                await self._scan_and_publish()
            except Exception:  # a bug in one scan must not stop the watch
                log.exception("scanning %s failed", self.directory)

    async def _scan_and_publish(self) -> None:
        new = await trio.to_thread.run_sync(self.scan)
        if new is not None:
            self.publish(new)
