"""The pages of the engine's K/V pool (host side; only the engine thread changes it).

A page is held by reference: by the request whose slot writes it, and, once it holds a whole page
of a cached prompt prefix, by each prefix-cache entry and each request that reads that prefix. It
returns to the free list when its last holder gives it back.
"""

from __future__ import annotations


class PageAllocator:
    """Hands out the pool's page ids 0..num_pages-1 and counts the holders of each."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"the K/V pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._refs: dict[int, int] = {}  # page -> holders, for pages in use

    @property
    def free(self) -> int:
        """Pages nobody holds."""
        return len(self._free)

    @property
    def used(self) -> int:
        """Pages held by at least one request or prefix-cache entry."""
        return len(self._refs)

    def refs(self, page: int) -> int:
        """How many holders `page` has (0: free)."""
        return self._refs.get(page, 0)

    def take(self, n: int) -> list[int] | None:
        """`n` free pages, each with one holder, or None (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        self._refs.update(dict.fromkeys(pages, 1))
        return pages

    def share(self, pages: list[int]) -> None:
        """One more holder for each of `pages` (distinct, in use); raises ValueError otherwise."""
        self._check(pages)
        for p in pages:
            self._refs[p] += 1

    def give(self, pages: list[int]) -> None:
        """One holder fewer for each of `pages` (distinct, in use); a page left without holders is
        free again. Raises ValueError for a page that is not in use."""
        self._check(pages)
        freed = []
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                del self._refs[p]
                freed.append(p)
        self._free.extend(reversed(freed))

    def _check(self, pages: list[int]) -> None:
        stray = [p for p in pages if p not in self._refs]
        if stray or len(set(pages)) != len(pages):
            raise ValueError(f"pages returned twice or never taken: {sorted(stray) or pages}")
