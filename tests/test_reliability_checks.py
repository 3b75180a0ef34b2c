"""``make reliability`` fails on a stage that ran and proved nothing, not only on a bad figure."""

import copy

from reliability.run import breaches_of

GOOD = {
    "totals": {"lost": 0, "answered_twice": 0, "5xx_seen": 0, "torn_entries_served": 0},
    "overload": {
        "refused_without_retry_after": 0,
        "accepted_on_time_ratio": 1.0,
        "server_up_after": True,
        "rss_growth_mb": 80.0,
        "rss_growth_bound_mb": 512.0,
    },
    "cache_crash": {
        "index_matches_files": True,
        "entries": 315,
        "dangling_before_repair": 0,
        "orphans_before_repair": 3,
        "rows_lost_on_reopen": 0,
        "writer_failed": 0,
    },
    "full_disk": {"sent": 4, "answered_200": 4, "errors_logged": 1},
    "security": {
        "keys_enforced": True,
        "cross_tenant_hits": 0,
        "tenant_a_hits_on_own_cache": 12,
        "tenant_b_answers": 12,
        "hostile_ids_served": 0,
    },
    "side_channel": {"statuses": [200, 400], "separated": False},
    "restart": {
        "lingering_at_restart": {"FIN_WAIT2": 4},
        "restart_refused": False,
        "served_in_time": True,
    },
    "abandoned": {
        "dropping_clients": {
            "answered_before_the_drop": 0,
            "computed_for_nobody": 0,
            "every_image_ended": True,
        },
        "partly_refused": {"status": 429, "computed_for_nobody": 0, "every_image_ended": True},
    },
    "schemathesis": {"exit_code": 0},
    "parser_fuzz": {"parsers_failed": 0, "parsers_tested": 1200},
    "worker_kill": {"tiny": {"killed_mid_batch": True, "replica_replaced": True}},
    "tenants": {
        "churn": {"a_job_kept": True, "a_image_status": 200},
        "namespace_flood": {
            "within_quota_plus_one_entry": True,
            "empty_folders": 0,
            "folders": 4,
            "namespaces": 4,
        },
    },
    "edge": {"never_reading": {"clients": 20, "dropped": 20, "served_others_meanwhile": True}},
    "jobs": {
        "accepted": 200,
        "ended_before_each_kill": [66, 134],
        "every_job_ended": True,
        "jobs_told": 200,
        "invalid_signatures": 0,
        "repeats_under_another_id": 0,
        "cross_tenant_reads": 0,
    },
    "ray_ingress": {
        "answered": 1300,
        "unanswered": 0,
        "errors": {},
        "image_links_fetched": 8,
        "image_links_asked": 8,
    },
    "cache_soak": {
        "prompts": 2000,
        "answers": {"200": 2000},
        "within_quota_plus_one_entry": True,
        "evictions": 1944,
        "end_hit_ratio": 0.92,
        "kill": {
            "killed_mid_eviction": True,
            "after_restart": {"orphans": 0, "dangling": 0},
            "served_after_restart": True,
        },
    },
}


def test_a_good_report_has_no_breach():
    assert breaches_of(GOOD) == []


def test_stages_that_prove_nothing_are_breaches():
    cases = [
        (("security", "tenant_a_hits_on_own_cache"), 0, "tenant A hits its own cache"),
        (("security", "tenant_b_answers"), 0, "tenant B answered"),
        (("cache_crash", "entries"), 0, "cache crash: entries written"),
        (("schemathesis", "exit_code"), 1, "schemathesis exit code 0"),
        (("cache_soak", "evictions"), 0, "soak: evicted"),
        (("side_channel", "separated"), True, "side channel: tenants' timings apart"),
        (("side_channel", "statuses"), [400], "side channel: probed"),
        (("restart", "lingering_at_restart"), {}, "restart: connections lingered"),
        (("restart", "restart_refused"), True, "restart: not refused"),
        (("jobs", "ended_before_each_kill"), [0, 200], "jobs: killed mid-run"),
        (("jobs", "jobs_told"), 199, "jobs: every job's webhook arrived"),
        (("jobs", "invalid_signatures"), 1, "jobs: every signature valid"),
        (("jobs", "repeats_under_another_id"), 1, "jobs: repeats only under their id"),
        (("jobs", "cross_tenant_reads"), 1, "jobs: no cross-tenant read"),
        (("cache_soak", "end_hit_ratio"), 0.0, "soak: hit ratio > 0 at the end"),
        (
            ("cache_crash", "dangling_before_repair"),
            1,
            "cache crash: no dangling row before repair",
        ),
        (("cache_crash", "rows_lost_on_reopen"), 2, "cache crash: no committed row lost"),
        (("cache_crash", "writer_failed"), 1, "cache crash: the writer ran until killed"),
        (("overload", "rss_growth_mb"), 900.0, "overload: memory growth bounded"),
        (("parser_fuzz", "parsers_tested"), 0, "parsers: cases ran"),
        (("worker_kill",), {}, "kill mid-batch and replace"),
        (
            ("cache_soak", "within_quota_plus_one_entry"),
            False,
            "soak: disk within quota + one entry",
        ),
    ]
    for path, value, breach in cases:
        report = copy.deepcopy(GOOD)
        if len(path) == 1:
            report[path[0]] = value
        else:
            report[path[0]][path[1]] = value
        assert breach in breaches_of(report), breach
    torn = copy.deepcopy(GOOD)
    torn["cache_soak"]["kill"]["after_restart"]["orphans"] = 2
    torn["cache_soak"]["kill"]["killed_mid_eviction"] = False
    assert {"soak: no orphan after restart", "soak: killed mid-eviction"} <= set(breaches_of(torn))
    for part, field, value, breach in (
        (
            "dropping_clients",
            "computed_for_nobody",
            123,
            "abandoned: nothing computed for gone clients",
        ),
        (
            "dropping_clients",
            "answered_before_the_drop",
            3,
            "abandoned: every client left unanswered",
        ),
        ("partly_refused", "computed_for_nobody", 9, "abandoned: refused whole"),
        ("partly_refused", "status", 200, "abandoned: refused whole"),
        ("dropping_clients", "every_image_ended", False, "abandoned: every image ended"),
        ("partly_refused", "every_image_ended", False, "abandoned: every image ended"),
    ):
        report = copy.deepcopy(GOOD)
        report["abandoned"][part][field] = value
        assert breach in breaches_of(report), breach
    skipped = copy.deepcopy(GOOD)
    skipped["full_disk"] = {"skipped": "no permission to mount a tmpfs"}
    assert "full disk: the stage ran" in breaches_of(skipped)


def test_the_new_stages_breach_on_what_the_tenant_probe_found():
    cases = [
        (("tenants", "churn", "a_job_kept"), False, "tenants: A's job outlives B's churn"),
        (("tenants", "churn", "a_image_status"), 404, "tenants: A's link outlives B's"),
        (("tenants", "namespace_flood", "empty_folders"), 1475, "tenants: no empty folder"),
        (("tenants", "namespace_flood", "folders"), 1826, "tenants: one folder a namespace"),
        (("edge", "never_reading", "dropped"), 0, "edge: never-reading clients dropped"),
        (("ray_ingress", "unanswered"), 16, "ray ingress: none unanswered"),
        (("ray_ingress", "answered"), 0, "ray ingress: none unanswered"),
        (("ray_ingress", "errors"), {"499": 4}, "ray ingress: none unanswered"),
        (("ray_ingress", "image_links_fetched"), 4, "ray ingress: links reach their image"),
    ]
    for path, value, breach in cases:
        report = copy.deepcopy(GOOD)
        node = report
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert breach in breaches_of(report), breach
