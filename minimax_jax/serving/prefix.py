"""The host index of the prefix cache: prompt prefixes of whole K/V pages whose decoding state is
kept, so a request whose prompt starts with one skips recomputing it.

A cached prefix of P tokens (P a multiple of the page size Z) is the P / Z pool pages holding its
softmax K/V, shared by reference with every request that reads it (`PageAllocator`), and a
snapshot of the per-slot state no page holds (the lightning layers' states and the tokens seen
by the sampler), one of `slots` snapshot slots on the device (`Steps.save_prefix`). Prefixes are
keyed by a hash chain over page-sized token blocks: key j = blake2b(key j-1 + block j), so a key
names the whole prefix before it. Entries are evicted least recently used first, when a new
snapshot needs a slot or an admission needs pages only the cache holds.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np

from minimax_jax.serving.pages import PageAllocator


def block_chain(tokens: list[int], page_size: int) -> list[bytes]:
    """The keys of the prefixes of `tokens` made of 1, 2, ... whole pages of `page_size` tokens
    (len(tokens) // page_size keys of 16 bytes)."""
    keys, key = [], b""
    ids = np.asarray(tokens, "<i4")
    for j in range(len(tokens) // page_size):
        key = hashlib.blake2b(key + ids[j * page_size:(j + 1) * page_size].tobytes(), digest_size=16).digest()
        keys.append(key)
    return keys


@dataclasses.dataclass
class CachedPrefix:
    """One cached prefix: `tokens` (a multiple of the page size), the pool `pages` holding its
    K/V (one reference each is this entry's), and its `snapshot` slot."""

    tokens: int
    pages: list[int]
    snapshot: int


class PrefixCache:
    """Cached prefixes over the pool `pages`, at most `slots` of them (one snapshot each)."""

    def __init__(self, slots: int, page_size: int, pages: PageAllocator):
        if slots < 1:
            raise ValueError(f"the prefix cache needs at least one snapshot slot, got {slots}")
        self.page_size, self.pages = page_size, pages
        self._entries: collections.OrderedDict[bytes, CachedPrefix] = collections.OrderedDict()  # LRU first
        self._free_slots = list(range(slots - 1, -1, -1))
        self._held: collections.Counter[int] = collections.Counter()  # page -> entries holding it

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def pages_held(self) -> int:
        """Pool pages at least one entry holds."""
        return len(self._held)

    def lookup(self, chain: list[bytes], prompt_tokens: int) -> CachedPrefix | None:
        """The longest cached prefix of a prompt of `prompt_tokens` tokens with the keys `chain`
        (`block_chain`) that leaves at least its last token to compute, or None. The entries on the
        way (shorter prefixes of it) and the hit become the most recently used, the hit last."""
        hit = None
        for key in chain[:(prompt_tokens - 1) // self.page_size]:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                hit = entry
        return hit

    def insert(self, key: bytes, tokens: int, pages: list[int]) -> int | None:
        """Cache the prefix `key` of `tokens` tokens on `pages` (held by the caller; the entry takes
        one more reference): returns the snapshot slot the caller must fill, evicting the least
        recently used entry when all are taken, or None when the prefix is cached already (it
        becomes the most recently used)."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return None
        if not self._free_slots:
            self.evict_oldest()
        self.pages.share(pages)
        self._held.update(pages)
        slot = self._free_slots.pop()
        self._entries[key] = CachedPrefix(tokens, list(pages), slot)
        return slot

    def evict_oldest(self, keep: CachedPrefix | None = None) -> bool:
        """Drop the least recently used entry other than `keep`; False when there is none."""
        key = next((k for k, e in self._entries.items() if e is not keep), None)
        if key is None:
            return False
        entry = self._entries.pop(key)
        self._held.subtract(entry.pages)
        for p in entry.pages:
            if self._held[p] == 0:
                del self._held[p]
        self.pages.give(entry.pages)
        self._free_slots.append(entry.snapshot)
        return True

    def make_room(self, n: int, keep: CachedPrefix | None = None) -> None:
        """Evict entries, oldest first (never `keep`), until `n` pages are free, provided the
        pages only the cache holds would make that many free; otherwise evict nothing."""
        kept = set() if keep is None else set(keep.pages)
        reclaimable = sum(1 for p, c in self._held.items() if self.pages.refs(p) == c and p not in kept)
        if self.pages.free + reclaimable < n:
            return
        while self.pages.free < n and self.evict_oldest(keep):
            pass

    def clear(self) -> None:
        """Drop every entry (their page references go back to the pool)."""
        while self.evict_oldest():
            pass

    def entries(self) -> list[CachedPrefix]:
        """The entries, least recently used first."""
        return list(self._entries.values())
