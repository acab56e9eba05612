"""The free pages of the engine's K/V pool (host side; only the engine thread changes it)."""

from __future__ import annotations


class PageAllocator:
    """Hands out the pool's page ids 0..num_pages-1 and takes them back."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"the K/V pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._used: set[int] = set()

    @property
    def free(self) -> int:
        """Pages no request holds."""
        return len(self._free)

    @property
    def used(self) -> int:
        """Pages held by requests."""
        return len(self._used)

    def take(self, n: int) -> list[int] | None:
        """`n` free pages, or None (nothing taken) when fewer than `n` are free."""
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def give(self, pages: list[int]) -> None:
        """Return pages from `take`; raises ValueError for a page that is not in use."""
        stray = [p for p in pages if p not in self._used]
        if stray or len(set(pages)) != len(pages):
            raise ValueError(f"pages returned twice or never taken: {sorted(stray) or pages}")
        self._used.difference_update(pages)
        self._free.extend(reversed(pages))
