"""What the server keeps after answering: per tenant, by count, bytes and age."""

from __future__ import annotations

from promptserve.server.images import ImageStore
from promptserve.server.jobs import JobBook, JobState
from promptserve.server.kept import Bounds, TenantShelf

BOUNDS = Bounds(count=3, bytes=100, ttl_s=60.0)


def test_one_tenants_churn_never_pushes_out_anothers_items():
    shelf: TenantShelf[str] = TenantShelf(BOUNDS)
    shelf.put("a", "a1", "A's", now=0.0, size=10)
    for i in range(600):  # B makes and drops hundreds of its own
        shelf.put("b", f"b{i}", "B's", now=1.0, size=10)
    assert shelf.get("a1", now=2.0) == ("a", "A's")
    assert shelf.held_by("b") == (3, 30)  # B holds its own three newest, no more
    assert shelf.get("b0", now=2.0) is None and shelf.get("b599", now=2.0) == ("b", "B's")


def test_a_tenant_over_its_bytes_loses_its_own_oldest_but_keeps_the_newest():
    shelf: TenantShelf[str] = TenantShelf(BOUNDS)
    shelf.put("a", "x", "x", now=0.0, size=60)
    shelf.put("a", "y", "y", now=0.0, size=60)  # 120 > 100: x goes
    assert shelf.get("x", 0.0) is None and shelf.get("y", 0.0) == ("a", "y")
    shelf.put("a", "z", "z", now=0.0, size=500)  # alone over the bound: the newest stays
    assert shelf.held_by("a") == (1, 500)


def test_items_expire_with_age_and_expiry_frees_their_tenant():
    shelf: TenantShelf[str] = TenantShelf(BOUNDS)
    shelf.put("a", "old", "v", now=0.0, size=5)
    shelf.put("a", "new", "v", now=50.0, size=5)
    assert shelf.get("old", now=59.0) == ("a", "v")
    assert shelf.expire(now=61.0) == 1
    assert shelf.get("old", now=61.0) is None and shelf.get("new", now=61.0) == ("a", "v")
    assert shelf.get("new", now=111.0) is None
    assert shelf.held_by("a") == (0, 0) and len(shelf) == 0


def test_image_links_are_bounded_per_tenant_and_carry_their_prefix():
    store = ImageStore(Bounds(count=2, bytes=1 << 20, ttl_s=600.0), prefix="01")
    mine = store.put("a", b"png-a", now=0.0)
    others = [store.put("b", b"png-b", now=0.0) for _ in range(52)]
    assert store.get(mine, now=1.0) == (b"png-a", "image/png")
    assert store.get(others[0], now=1.0) is None and store.get(others[-1], now=1.0) is not None
    assert all(i.startswith("01") and len(i) == 32 for i in [mine, *others])
    assert store.get(mine, now=601.0) is None  # expired


def test_finished_jobs_are_kept_per_tenant_and_live_ones_always():
    book = JobBook(Bounds(count=2, bytes=1 << 20, ttl_s=3600.0))
    running = JobState("r", "a")
    done = JobState("d", "a")
    for state in (running, done):
        book.add(state)
    done.finish("succeeded")
    book.ended(done, now=0.0)
    for i in range(600):  # tenant b creates and cancels hundreds of jobs
        job = JobState(f"b{i}", "b")
        book.add(job)
        job.finish("cancelled")
        book.ended(job, now=1.0)
    assert book.get("d", "a", now=2.0) is done and book.get("r", "a", now=2.0) is running
    assert book.get("d", "b", now=2.0) is None  # another tenant's id answers nothing
    assert book.get("d", "a", now=3601.0) is None  # finished jobs expire
    assert book.get("r", "a", now=1e9) is running  # a live one never does
