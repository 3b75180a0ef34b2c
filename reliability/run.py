"""``make reliability``: every scenario in bounded time, one JSON line, exit 1 on any breach."""

from __future__ import annotations

import json
import sys
import time

from reliability import (
    abandoned,
    badinput,
    edge,
    faults,
    jobs,
    overload,
    ray_ingress,
    restart,
    security,
    side_channel,
    soak,
    tenants,
)


def main() -> int:
    t0 = time.monotonic()
    report: dict = {"bench": "reliability"}
    stages = [
        ("overload", overload.run),
        ("cache_crash", faults.cache_crashes),
        ("full_disk", faults.full_disk),
        ("security", security.run),
        ("tenants", tenants.run),
        ("edge", edge.run),
        ("side_channel", side_channel.run),
        ("restart", restart.run),
        ("jobs", jobs.run),
        ("abandoned", abandoned.run),
        ("schemathesis", badinput.schemathesis),
        ("parser_fuzz", badinput.parser_fuzz),
        ("worker_kill", faults.worker_kills),
        ("ray_ingress", ray_ingress.run),
        ("cache_soak", soak.run),
    ]
    for name, stage in stages:
        started = time.monotonic()
        print(f"reliability: {name}…", file=sys.stderr, flush=True)
        report[name] = stage()
        report[name]["seconds"] = round(time.monotonic() - started, 1)
    kills = backends(report["worker_kill"])
    o = report["overload"]
    report["totals"] = {
        "requests_sent": o["sent"] + sum(k["sent"] for k in kills),
        "accepted": o["accepted"] + sum(k["sent"] for k in kills),
        "refused": o["refused_429"],
        "lost": o["lost"] + sum(k["unanswered"] + k["failed"] for k in kills),
        "answered_twice": o["answered_twice"] + sum(k["answered_twice"] for k in kills),
        "peak_rss_mb": o["peak_rss_mb"],
        "5xx_seen": o["server_errors_5xx"]
        + o["dropped_503"]
        + report["security"]["hostile_ids_5xx"]
        + report["schemathesis"]["operations_with_5xx"],
        "torn_entries_served": report["cache_crash"]["torn_served"],
        "seconds": round(time.monotonic() - t0, 1),
    }
    breaches = breaches_of(report)
    report["breaches"] = breaches
    print(json.dumps(report))
    return 1 if breaches else 0


def backends(kills: dict) -> list[dict]:
    return [v for v in kills.values() if isinstance(v, dict)]


def breaches_of(r: dict) -> list[str]:
    t, o = r["totals"], r["overload"]
    checks = {
        "lost": t["lost"] == 0,
        "answered twice": t["answered_twice"] == 0,
        "5xx": t["5xx_seen"] == 0,
        "torn entries served": t["torn_entries_served"] == 0,
        "index matches files": r["cache_crash"]["index_matches_files"],
        # read before the reopen repairs anything: files go before their row, so no row may
        # name a missing file, and no committed row may vanish on reopen
        "cache crash: no dangling row before repair": r["cache_crash"]["dangling_before_repair"]
        == 0,
        "cache crash: no committed row lost": r["cache_crash"]["rows_lost_on_reopen"] == 0,
        "cache crash: the writer ran until killed": r["cache_crash"]["writer_failed"] == 0,
        "overload: memory growth bounded": o["rss_growth_mb"] <= o["rss_growth_bound_mb"],
        "429 without Retry-After": o["refused_without_retry_after"] == 0,
        "accepted on time >= 99%": (o["accepted_on_time_ratio"] or 0) >= 0.99,
        "server up after the burst": o["server_up_after"],
        "full disk: the stage ran": "skipped" not in r["full_disk"]
        and r["full_disk"].get("sent", 0) > 0,
        "full disk: all answered": r["full_disk"].get("answered_200") == r["full_disk"].get("sent"),
        "full disk: logged once": r["full_disk"].get("errors_logged") == 1,
        "keys enforced": r["security"]["keys_enforced"],
        "tenant isolation": r["security"]["cross_tenant_hits"] == 0,
        # isolation that "passes" because caching broke proves nothing: A must hit its own cache
        "tenant A hits its own cache": r["security"]["tenant_a_hits_on_own_cache"] > 0,
        "tenant B answered": r["security"]["tenant_b_answers"] > 0,
        "cache crash: entries written": r["cache_crash"]["entries"] > 0,
        "schemathesis exit code 0": r["schemathesis"]["exit_code"] == 0,
        "hostile ids refused": r["security"]["hostile_ids_served"] == 0,
        # the probe must have run as designed: A's prompts generated, B's refused before it
        "side channel: probed": r["side_channel"]["statuses"] == [200, 400],
        "side channel: tenants' timings apart": not r["side_channel"]["separated"],
        "restart: connections lingered": sum(r["restart"]["lingering_at_restart"].values()) > 0,
        "restart: not refused": not r["restart"]["restart_refused"],
        "restart: serving within a cold start + 10 s": r["restart"]["served_in_time"],
        # the clients really left before any answer, and nothing was computed for them
        "abandoned: every client left unanswered": r["abandoned"]["dropping_clients"][
            "answered_before_the_drop"
        ]
        == 0,
        "abandoned: nothing computed for gone clients": r["abandoned"]["dropping_clients"][
            "computed_for_nobody"
        ]
        == 0,
        "abandoned: refused whole": r["abandoned"]["partly_refused"]["status"] in (429, 503)
        and r["abandoned"]["partly_refused"]["computed_for_nobody"] == 0,
        "parsers": r["parser_fuzz"]["parsers_failed"] == 0,
        "parsers: cases ran": r["parser_fuzz"]["parsers_tested"] > 0,
        "abandoned: every image ended": r["abandoned"]["dropping_clients"]["every_image_ended"]
        and r["abandoned"]["partly_refused"]["every_image_ended"],
        "soak: every request answered": r["cache_soak"]["answers"].get("200")
        == r["cache_soak"]["prompts"],
        "soak: disk within quota + one entry": r["cache_soak"]["within_quota_plus_one_entry"],
        "soak: evicted": r["cache_soak"]["evictions"] > 0,
        "soak: hit ratio > 0 at the end": r["cache_soak"]["end_hit_ratio"] > 0,
        "soak: killed mid-eviction": r["cache_soak"]["kill"]["killed_mid_eviction"],
        "soak: no orphan after restart": r["cache_soak"]["kill"]["after_restart"]["orphans"] == 0,
        "soak: no dangling entry after restart": r["cache_soak"]["kill"]["after_restart"][
            "dangling"
        ]
        == 0,
        "soak: serves after restart": r["cache_soak"]["kill"]["served_after_restart"],
        "tenants: A's job outlives B's churn": r["tenants"]["churn"]["a_job_kept"],
        "jobs: every accepted job ended": r["jobs"]["every_job_ended"],
        "jobs: killed mid-run": min(r["jobs"]["ended_before_each_kill"], default=0) > 0
        and max(r["jobs"]["ended_before_each_kill"], default=0) < r["jobs"]["accepted"],
        "jobs: every job's webhook arrived": r["jobs"]["jobs_told"] == r["jobs"]["accepted"],
        "jobs: every signature valid": r["jobs"]["invalid_signatures"] == 0,
        "jobs: repeats only under their id": r["jobs"]["repeats_under_another_id"] == 0,
        "jobs: no cross-tenant read": r["jobs"]["cross_tenant_reads"] == 0,
        "tenants: A's link outlives B's": r["tenants"]["churn"]["a_image_status"] == 200,
        "tenants: looks within the quota": r["tenants"]["namespace_flood"][
            "within_quota_plus_one_entry"
        ],
        "tenants: no empty folder": r["tenants"]["namespace_flood"]["empty_folders"] == 0,
        "tenants: one folder a namespace": r["tenants"]["namespace_flood"]["folders"]
        == r["tenants"]["namespace_flood"]["namespaces"],
        "edge: never-reading clients dropped": r["edge"]["never_reading"]["dropped"]
        == r["edge"]["never_reading"]["clients"],
        "edge: others served meanwhile": r["edge"]["never_reading"]["served_others_meanwhile"],
        "ray ingress: none unanswered": r["ray_ingress"]["unanswered"] == 0
        and r["ray_ingress"]["answered"] > 0
        and not {
            c for c in r["ray_ingress"]["errors"] if c in ("0", "499", "500", "502", "503", "504")
        },
        "ray ingress: links reach their image": r["ray_ingress"]["image_links_fetched"]
        == r["ray_ingress"]["image_links_asked"],
        "kill mid-batch and replace": bool(backends(r["worker_kill"]))
        and all(
            k["killed_mid_batch"] and k["replica_replaced"] for k in backends(r["worker_kill"])
        ),
    }
    return [name for name, ok in checks.items() if not ok]


if __name__ == "__main__":
    sys.exit(main())
