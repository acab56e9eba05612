"""The prefix cache's host side: page references, the hash chain of page blocks, lookups of the
longest cached prefix, least-recently-used eviction under the snapshot budget and under page
pressure (hits through the engine, equal to recomputing: tests/test_decode_loop.py)."""

from __future__ import annotations

import pytest

from minimax_jax.serving.pages import PageAllocator
from minimax_jax.serving.prefix import PrefixCache, block_chain

Z = 4  # tokens per page


def test_pages_are_freed_by_their_last_holder():
    pool = PageAllocator(4)
    a = pool.take(3)
    assert a == [0, 1, 2] and pool.free == 1 and pool.used == 3
    pool.share(a[:2])
    assert [pool.refs(p) for p in range(4)] == [2, 2, 1, 0]
    pool.give(a)
    assert pool.free == 2 and pool.used == 2 and pool.take(3) is None
    pool.give(a[:2])
    assert pool.free == 4 and pool.used == 0
    with pytest.raises(ValueError, match="never taken"):
        pool.give([0])
    with pytest.raises(ValueError, match="never taken"):
        pool.share([3])


def test_block_chain_keys_name_the_whole_prefix():
    a = block_chain(list(range(10)), Z)
    assert len(a) == 2 and len(set(a)) == 2  # 10 tokens: 2 whole pages
    assert block_chain(list(range(8)) + [0, 0], Z) == a  # what follows the pages does not count
    b = block_chain([99] + list(range(1, 12)), Z)
    assert b[0] != a[0] and b[1] != a[1]  # a different first block changes every later key
    assert block_chain(list(range(4, 8)), Z)[0] != a[1]  # the same block after another prefix


def make_cache(slots: int, num_pages: int = 32) -> tuple[PrefixCache, PageAllocator]:
    pool = PageAllocator(num_pages)
    return PrefixCache(slots, Z, pool), pool


def cache_prompt(cache: PrefixCache, pool: PageAllocator, prompt: list[int]) -> list[int]:
    """What a request does: take pages for `prompt`, cache every whole-page prefix, end."""
    pages = pool.take(-(-len(prompt) // Z))
    for j, key in enumerate(block_chain(prompt, Z), start=1):
        cache.insert(key, j * Z, pages[:j])
    pool.give(pages)
    return pages


def test_lookup_finds_the_longest_prefix_that_leaves_a_token_to_compute():
    cache, pool = make_cache(8)
    prompt = list(range(12))
    pages = cache_prompt(cache, pool, prompt)
    assert len(cache) == 3 and pool.used == 3 and cache.pages_held == 3
    assert [pool.refs(p) for p in pages] == [3, 2, 1]  # held by the 3, 2 and 1 page entries

    def hit(p: list[int]) -> int:
        entry = cache.lookup(block_chain(p, Z), len(p))
        return 0 if entry is None else entry.tokens

    assert hit(prompt) == 8  # all 12 cached, but the last token must be computed
    assert hit(prompt + [50]) == 12
    assert hit(prompt[:6] + [77] * 10) == 4  # shares 6 tokens: one whole page, the rest recomputed
    assert hit([5] + prompt[1:]) == 0
    entry = cache.lookup(block_chain(prompt + [1], Z), 13)
    assert entry.pages == pages[:3] and entry.tokens == 12


def test_the_least_recently_used_prefix_is_evicted_first():
    cache, pool = make_cache(3)
    a, b = [1] * 4, [2] * 4
    cache_prompt(cache, pool, a + [0])
    cache_prompt(cache, pool, b + [0])
    cache_prompt(cache, pool, [3] * 4)
    assert cache.lookup(block_chain(a + [9], Z), 5).tokens == 4  # a is now the most recent
    cache_prompt(cache, pool, [4] * 4)  # a fourth entry: b, the least recently used, goes
    assert cache.lookup(block_chain(b + [9], Z), 5) is None
    assert cache.lookup(block_chain(a + [9], Z), 5) is not None
    assert [e.pages for e in cache.entries()][-1] == cache.lookup(block_chain(a + [9], Z), 5).pages
    assert len(cache) == 3 and pool.used == 3  # b's page went back to the pool
    snapshots = sorted(e.snapshot for e in cache.entries())
    assert snapshots == [0, 1, 2]  # the evicted entry's snapshot slot was reused


def test_room_is_made_only_from_pages_the_cache_alone_holds():
    cache, pool = make_cache(8, num_pages=6)
    cache_prompt(cache, pool, list(range(8)))  # 2 pages, in a 1-page and a 2-page entry
    running = pool.take(2)
    cache.insert(block_chain([7] * 4, Z)[0], 4, running[:1])  # a page a running request holds too
    assert pool.free == 2 and len(cache) == 3
    cache.make_room(5)  # evicting everything would free only 2 more pages: nothing is evicted
    assert len(cache) == 3 and pool.free == 2
    hit = cache.lookup(block_chain(list(range(4)) + [9], Z), 5)  # a request reading the 1-page prefix
    pool.share(hit.pages)
    cache.make_room(3, keep=hit)  # the oldest other entry (2 pages) goes; its second page is freed
    assert pool.free == 3 and [e.tokens for e in cache.entries()] == [4, 4] and hit in cache.entries()
    cache.clear()
    assert len(cache) == 0 and pool.free == 3
    pool.give(hit.pages)
    pool.give(running)
    assert pool.free == 6
