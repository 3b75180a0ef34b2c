"""Through Ray Serve on a local Ray (2 CPUs): the same API, replicas at their own levels, and a
replica killed mid-batch. Ray takes seconds to start: one session for the module, few tests."""

import base64
import dataclasses
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import safetensors.torch
from PIL import Image

from factories import until_cached
from promptserve.cache.latents import BLOCK, FOLDER_BYTES, allocated
from promptserve.distributed import RaySettings, run_on_ray
from promptserve.distributed.chaos import kill_busy_worker, wait_workers_up
from promptserve.distributed.tenant_router import SESSION_HEADER, SESSION_HEADER_ENV
from promptserve.engine.lora import random_adapter
from promptserve.engine.shapes import build
from promptserve.loadgen import read_metric
from promptserve.policy.shards import ShardRing
from promptserve.server import ServerConfig
from promptserve.server.live import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_settings():
    # as run_on_ray does for a local Ray: the proxy gives the tenant router each caller's key
    os.environ.setdefault(SESSION_HEADER_ENV, SESSION_HEADER)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    settings = RaySettings(num_cpus=2, worker_cpus=0.5, port=free_port())
    serve.start(http_options={"host": settings.host, "port": settings.port})
    yield settings
    serve.shutdown()
    ray.shutdown()


def deploy(settings, tmp_path: Path, **config) -> str:
    serve.delete("promptserve", _blocking=True)
    config.setdefault("workers", 2)
    return run_on_ray(ServerConfig(embedder="hashing", cache_dir=tmp_path, **config), settings)


def test_two_ingress_replicas_each_hold_their_tenants_and_their_caches(ray_settings, tmp_path):
    ring = ShardRing(2)
    names = [f"team-{i}" for i in range(40)]
    # two tenants on each replica's shard
    tenants = [t for t in names if ring.shard_of(t) == 0][:2]
    tenants += [t for t in names if ring.shard_of(t) == 1][:2]
    keys = {f"sk-{t}": t for t in tenants}
    settings = dataclasses.replace(ray_settings, ingress_replicas=2)
    url = deploy(settings, tmp_path, model="tiny", slo_s=120, api_keys=keys)

    def auth(tenant: str) -> dict:
        return {"Authorization": f"Bearer sk-{tenant}"}

    pids = {}
    for tenant in tenants:
        for _ in range(3):  # every request of a tenant lands on its shard's replica
            answer = httpx.get(f"{url}/v1/cluster", headers=auth(tenant), timeout=60).json()
            assert answer["ingress"]["shard"] == ring.shard_of(tenant), tenant
            assert answer["ingress"]["of"] == 2 and len(answer["workers"]) == 1
            pids[answer["ingress"]["shard"]] = answer["ingress"]["pid"]
    assert len(set(pids.values())) == 2  # two ingress processes

    def similarity(tenant: str) -> float | None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=f"sk-{tenant}", max_retries=0)
        image = client.images.generate(prompt="a lighthouse at dusk", size="64x64")
        return image.data[0].model_extra["promptserve"]["similarity"]

    first, same_shard, other_shard = tenants[0], tenants[1], tenants[2]
    assert similarity(first) is None
    assert similarity(first) > 0.99  # its own partition, on its own replica
    assert similarity(same_shard) is None  # tenants never share entries, on one replica
    assert similarity(other_shard) is None  # nor across replicas
    # each replica's entries and latents in its own folder
    for shard in (0, 1):
        assert list((tmp_path / f"ingress-{shard}").rglob("*.safetensors"))
    # requests with no key are spread over the replicas, and an image link reaches the image
    # whichever replica the router picks (the one asked fetches it from its holder)
    answered_by = {
        httpx.get(f"{url}/v1/cluster", timeout=30).json()["ingress"]["shard"] for _ in range(12)
    }
    assert answered_by == {0, 1}
    for tenant in (first, other_shard):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=f"sk-{tenant}", max_retries=0)
        link = (
            client.images.generate(prompt="a kite", size="64x64", response_format="url").data[0].url
        )
        assert int(link.rsplit("/", 1)[1][:2], 16) == ring.shard_of(tenant)  # its holder
        fetched = [httpx.get(f"{url}{link}", timeout=30) for _ in range(8)]
        assert {r.status_code for r in fetched} == {200}
        assert len({r.content for r in fetched}) == 1
    with pytest.raises(openai.AuthenticationError):  # an unknown key routes, and is refused
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).images.generate(
            prompt="a lighthouse at dusk", size="64x64"
        )


def test_openai_client_through_ray_with_replicas_at_two_levels(ray_settings, tmp_path):
    # pinned GPUs (the published shape): the planner's levels reach the replicas
    url = deploy(ray_settings, tmp_path, model="tiny", slo_s=120, policy="promptserve")
    workers = httpx.get(f"{url}/v1/cluster").json()["workers"]
    assert len({w["pid"] for w in workers}) == 2  # two replicas, two processes
    assert len({w["level"] for w in workers}) == 2  # the planner's levels reached them
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    first = client.images.generate(prompt="a red fox in the snow", size="64x64")
    until_cached(url, 1)
    again = client.images.generate(prompt="a red fox in the snow", size="64x64")
    assert first.data[0].model_extra["promptserve"]["similarity"] is None
    # the latents one replica made are in the index the ingress keeps for all of them
    assert again.data[0].model_extra["promptserve"]["similarity"] > 0.99
    workers = httpx.get(f"{url}/v1/cluster").json()["workers"]
    assert sum(w["batches"] for w in workers) == 2
    # the replicas wrote the latents to the shared store themselves
    on_disk = sum(allocated(p.stat()) for p in tmp_path.rglob("*.safetensors"))
    assert sum(w["bytes_written"] for w in workers) == on_disk > 0
    assert_streams(client)
    assert_every_size_at_once(client, url)


def assert_every_size_at_once(client, url: str) -> None:
    """Every listed size asked for at once: each answer's PNG has its size."""
    listed = httpx.get(f"{url}/v1/models/tiny", timeout=30).json()["sizes"]
    assert len(listed) > 1

    def one(size: str) -> tuple[str, bytes]:
        res = client.images.generate(prompt=f"a tram at {size}", size=size)
        return size, base64.b64decode(res.data[0].b64_json)

    with ThreadPoolExecutor(len(listed)) as pool:
        for size, png in pool.map(one, listed):
            width, height = Image.open(io.BytesIO(png)).size
            assert f"{width}x{height}" == size


def assert_streams(client) -> None:
    """Partial images stream back from a replica as the official client expects them."""
    stream = client.images.generate(
        prompt="a kite over dunes", size="64x64", stream=True, partial_images=2
    )
    kinds = [type(e).__name__ for e in stream]
    assert kinds == ["ImageGenPartialImageEvent"] * 2 + ["ImageGenCompletedEvent"], kinds


def answers_around_a_kill(url: str, n: int) -> tuple[list, dict]:
    """``n`` concurrent images while the replica running one is SIGKILLed; each answer or
    exception, and the victim's last ping."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    answers: list = []

    def ask(i: int) -> None:
        try:
            answers.append(client.images.generate(prompt=f"prompt number {i}", size="1024x1024"))
        except Exception as exc:  # recorded, asserted by the caller
            answers.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    victim = kill_busy_worker(url)
    assert victim is not None, "nothing was running to kill"
    for t in threads:
        t.join(timeout=240)
    return answers, victim


def test_killed_replica_requests_all_complete(ray_settings, tmp_path):
    # modelled SDXL latencies at 2x: a full batch takes seconds, long enough to kill mid-way
    url = deploy(
        ray_settings, tmp_path, model="sdxl-reference", backend="modeled", speedup=2.0, slo_s=300
    )
    answers, victim = answers_around_a_kill(url, 6)
    assert len(answers) == 6
    assert all(not isinstance(a, Exception) for a in answers), answers
    assert all(len(a.data) == 1 for a in answers)
    assert read_metric(url, "promptserve_requests_retried") >= 1
    assert read_metric(url, "promptserve_requests_total", {"outcome": "served"}) == 6
    # Serve replaces the replica; the runtime takes it back into the plan
    assert wait_workers_up(url, 2)
    pids = {w["index"]: w["pid"] for w in httpx.get(f"{url}/v1/cluster").json()["workers"]}
    assert pids[victim["index"]] != victim["pid"]


def test_step_level_serving_on_ray_resumes_from_the_shared_store_and_cancels(
    ray_settings, tmp_path
):
    # continuous-ht: every request at the fastest level it tolerates, so a twin resumes at K > 0
    loras = tmp_path.parent / f"{tmp_path.name}-loras"
    loras.mkdir()
    state = random_adapter(build("tiny").unet, "unet.", 4, 1, ("to_q", "to_v"))
    safetensors.torch.save_file(state, loras / "ink.safetensors")
    url = deploy(
        ray_settings, tmp_path, model="tiny", slo_s=120, policy="continuous-ht", lora_dir=loras
    )
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    first = client.images.generate(prompt="a red fox in the snow", size="64x64")
    until_cached(url, 1)
    again = client.images.generate(prompt="a red fox in the snow", size="64x64")
    assert first.data[0].model_extra["promptserve"]["level_k"] == 0  # a miss: from noise
    twin = again.data[0].model_extra["promptserve"]
    # the replica that ran the first wrote its captures to the shared store; the replica that
    # ran the twin read its start latent from there, at the fastest level
    assert twin["similarity"] > 0.99 and twin["cache_hit"] is True
    assert twin["level_k"] == twin["k_opt"] > 0
    # another look is another namespace: the same prompt with a negative prompt runs from noise
    look = (
        client.images.generate(
            prompt="a red fox in the snow",
            extra_body={"negative_prompt": "fog", "guidance_scale": 3},
        )
        .data[0]
        .model_extra["promptserve"]
    )
    assert look["cache_hit"] is False and look["guidance_scale"] == 3.0
    wide = client.images.generate(prompt="a red fox in the snow", size="96x64").data[0]
    assert Image.open(io.BytesIO(base64.b64decode(wide.b64_json))).size == (96, 64)
    assert wide.model_extra["promptserve"]["cache_hit"] is False  # another size: no neighbour
    # the replicas loaded the adapter folder: a request names an adapter, its image differs
    inked = client.images.generate(
        prompt="a red fox in the snow", extra_body={"lora": [{"name": "ink"}], "seed": 1}
    ).data[0]
    plain = client.images.generate(prompt="a red fox in the snow", extra_body={"seed": 1}).data[0]
    assert inked.model_extra["promptserve"]["lora"] == [{"name": "ink", "scale": 1.0}]
    assert inked.b64_json != plain.b64_json
    workers = httpx.get(f"{url}/v1/cluster").json()["workers"]
    on_disk = sum(allocated(p.stat()) for p in tmp_path.rglob("*.safetensors"))
    assert sum(w["bytes_written"] for w in workers) == on_disk > 0
    assert sum(w["steps"] for w in workers) > 0 and sum(w["batches"] for w in workers) == 0
    assert_streams(client)
    assert_every_size_at_once(client, url)
    assert_edits(client, url)


def assert_edits(client: openai.OpenAI, url: str) -> None:
    """Edits on the replicas: reproduced by seed, kept outside a mask, streamed, and never
    written to the shared store."""
    rng = np.random.default_rng(3)
    picture = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.full((64, 64, 4), 255, np.uint8)
    mask[16:48, 16:48, 3] = 0

    def png(pixels: np.ndarray) -> bytes:
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")
        return out.getvalue()

    def edit(seed: int, **fields) -> np.ndarray:
        answer = client.images.edit(
            image=("in.png", png(picture), "image/png"), prompt="a fox", size="64x64",
            extra_body={"seed": seed}, **fields,
        )  # fmt: skip
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))))

    written = sum(w["bytes_written"] for w in httpx.get(f"{url}/v1/cluster").json()["workers"])
    assert (edit(5) == edit(5)).all() and (edit(5) != edit(6)).any()
    a = edit(1, mask=("m.png", png(mask), "image/png"))
    b = edit(2, mask=("m.png", png(mask), "image/png"))
    assert (a[:16] == picture[:16]).all() and (a[16:48, 16:48] != b[16:48, 16:48]).any()
    events = list(
        client.images.edit(
            image=("in.png", png(picture), "image/png"), prompt="a fox", stream=True,
            partial_images=1,
        )
    )  # fmt: skip
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    after = sum(w["bytes_written"] for w in httpx.get(f"{url}/v1/cluster").json()["workers"])
    assert after == written  # an edit's latents are its own image's: nothing to cache


def test_on_ray_the_ingress_evicts_what_the_workers_wrote_within_the_quota(ray_settings, tmp_path):
    from promptserve.cache.approx import audit
    from promptserve.server import cache_root

    # a tiny-model entry is 5 latent files of about 1.2 KB, a 4 KiB block each on the disk,
    # beside its tenant's folder: the quota holds two entries
    quota = 2 * 5 * BLOCK + FOLDER_BYTES + 1000
    url = deploy(ray_settings, tmp_path, model="tiny", slo_s=120, cache_max_bytes=quota)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    for prompt in ("a red fox", "a blue whale", "a green parrot", "a grey wolf", "a red fox"):
        client.images.generate(prompt=prompt, size="64x64")
    assert read_metric(url, "promptserve_cache_evictions") >= 2
    on_disk = sum(allocated(p.stat()) for p in tmp_path.rglob("*.safetensors"))
    assert on_disk + FOLDER_BYTES == read_metric(url, "promptserve_cache_bytes") <= quota
    state = audit(cache_root(tmp_path))
    assert state["orphans"] == 0 and state["dangling"] == 0 and state["rows"] >= 1


def deploy_modeled_step(settings, tmp_path: Path) -> str:
    """promptserve-step on modelled SDXL steps at 2x: a request is in flight for seconds,
    long enough to cancel it or kill its replica."""
    return deploy(
        settings,
        tmp_path,
        model="sdxl-reference",
        backend="modeled",
        speedup=2.0,
        slo_s=300,
        policy="promptserve-step",
    )


def test_cancelling_a_step_level_member_on_ray_frees_its_slot(ray_settings, tmp_path):
    url = deploy_modeled_step(ray_settings, tmp_path)
    job = httpx.post(f"{url}/v1/jobs", json={"prompt": "a storm at sea"}, timeout=30).json()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        w["inflight"] for w in httpx.get(f"{url}/v1/cluster").json()["workers"]
    ):
        time.sleep(0.05)
    cancelled = httpx.delete(f"{url}/v1/jobs/{job['id']}", timeout=60).json()
    assert cancelled["status"] == "cancelled"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        w["inflight"] for w in httpx.get(f"{url}/v1/cluster").json()["workers"]
    ):
        time.sleep(0.05)
    assert not any(w["inflight"] for w in httpx.get(f"{url}/v1/cluster").json()["workers"])
    assert read_metric(url, "promptserve_requests_total", {"outcome": "served"}) == 0


def test_a_killed_replica_s_step_level_members_rejoin_and_all_complete(ray_settings, tmp_path):
    url = deploy_modeled_step(ray_settings, tmp_path)
    answers, _ = answers_around_a_kill(url, 4)
    assert len(answers) == 4
    assert all(not isinstance(a, Exception) for a in answers), answers
    assert read_metric(url, "promptserve_requests_retried") >= 1
    assert read_metric(url, "promptserve_requests_total", {"outcome": "served"}) == 4


def test_on_ray_a_tight_deadline_is_met_at_a_cheaper_interval(ray_settings, tmp_path):
    """Mixed (K, r) members through Ray: the ingress's scheduler picks the interval, the
    workers run it (the tiny model, feature caching on by default)."""
    from test_feature_levels import assert_a_tight_deadline_buys_an_interval

    url = deploy(ray_settings, tmp_path, model="tiny", slo_s=120, policy="promptserve-step")
    assert httpx.get(f"{url}/v1/server").json()["profile"]["feature_r_max"] == 4
    assert_a_tight_deadline_buys_an_interval(url)
    served = read_metric(url, "promptserve_images_by_interval_total", {"interval": "1"})
    assert served >= 1  # the twin, at r = 1 (K > 0)


@pytest.mark.parametrize("family", ["zimage", "qwenimage"])
def test_the_new_families_serve_on_ray(ray_settings, tmp_path, family):
    """A Z-Image and a Qwen-Image folder on worker replicas (4 steps): generations, a stream,
    a twin resumed from the shared store, and the model card naming the family."""
    from promptserve.engine.pipelines import pipeline_for

    c = build(family)
    folder = tmp_path.parent / f"{tmp_path.name}-{family}"
    pipeline_for(c, c.guidance_spec.default).save_pretrained(folder)
    url = deploy(
        ray_settings, tmp_path, model=str(folder), slo_s=300, policy="continuous-ht",
        sizes=((64, 64),), steps=4, workers=1,
    )  # fmt: skip
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    first = client.images.generate(prompt="a red fox in the snow", size="64x64")
    until_cached(url, 1)
    twin = client.images.generate(prompt="a red fox in the snow", size="64x64")
    assert first.data[0].model_extra["promptserve"]["level_k"] == 0
    assert twin.data[0].model_extra["promptserve"]["cache_hit"] is True
    stream = client.images.generate(prompt="a kite", size="64x64", stream=True, partial_images=2)
    kinds = [type(e).__name__ for e in stream]  # 4 steps leave room for fewer previews
    assert kinds[-1] == "ImageGenCompletedEvent" and "ImageGenPartialImageEvent" in kinds
    card = client.models.list().data[0].model_extra
    assert card["family"] == family and card["steps"] == 4


def test_a_qwen_image_edit_folder_edits_two_images_on_ray(ray_settings, tmp_path):
    """Qwen-Image-Edit on a worker replica: an edit of two images (both travel to the worker,
    each at its own size) from step 0, and a generation refused at the ingress."""
    from promptserve.engine.pipelines import pipeline_for, save_pipeline

    folder = tmp_path.parent / f"{tmp_path.name}-qwen-edit"
    save_pipeline(pipeline_for(build("qwenimage-edit"), 4.0), folder)
    url = deploy(
        ray_settings, tmp_path, model=str(folder), slo_s=300, sizes=((64, 64),), steps=2,
        workers=1,
    )  # fmt: skip
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    files = []
    for shade, size in ((40, (64, 64)), (200, (48, 32))):
        out = io.BytesIO()
        Image.new("RGB", size, (shade, 90, 30)).save(out, format="PNG")
        files.append((f"{shade}.png", out.getvalue(), "image/png"))
    edit = client.images.edit(image=files, prompt="put them side by side")
    assert edit.data[0].model_extra["promptserve"]["edit_start"] == 0
    assert Image.open(io.BytesIO(base64.b64decode(edit.data[0].b64_json))).size == (64, 64)
    with pytest.raises(openai.BadRequestError, match="/v1/images/edits"):
        client.images.generate(prompt="a red fox")
