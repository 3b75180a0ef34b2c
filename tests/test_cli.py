import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from promptserve.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_help_lists_the_commands():
    out = run("--help")
    assert out.exit_code == 0
    assert "workload" in out.output and "thresholds" in out.output


@pytest.mark.parametrize("thresholds", [["--thresholds", "clip"], []])
def test_workload_inspect_prints_rate_and_mix_and_writes_a_plot(tmp_path, thresholds):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox in snow\na red fox in the snow\na tax form\na red fox in snow\n")
    png = tmp_path / "w.png"
    out = run(
        "workload",
        "inspect",
        "--prompts",
        str(prompts),
        "--arrivals",
        "poisson",
        "--rate",
        "30",
        "--minutes",
        "2",
        "--embedder",
        "hashing",
        *thresholds,  # none: the embedder's own table (hashing reads the CLIP one)
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(png),
    )
    assert out.exit_code == 0, out.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "optimal K mix" in out.output and "published" in out.output
    shares = [float(x) for x in re.findall(r"(\d+\.\d)%", out.output)]
    assert abs(sum(shares[0::2]) - 100) < 0.5  # this workload's column sums to 100%
    # one replay with simulate: a new tenant per pass over the file, so a pass meets its own
    # near-duplicates (one exact repeat in four), not exact repeats of the pass before (~95%)
    assert 15.0 <= shares[0] <= 35.0  # K_opt = 25


def test_bad_spec_is_one_line_and_exit_2(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    out = run("workload", "inspect", "--prompts", str(prompts), "--arrivals", "gamma")
    assert out.exit_code == 2
    assert "arrival spec 'gamma'" in out.output and "Traceback" not in out.output


def test_missing_prompts_file_is_exit_2(tmp_path):
    out = run("workload", "inspect", "--prompts", str(tmp_path / "none.txt"), "--rate", "5")
    assert out.exit_code == 2 and "does not exist" in out.output


def test_thresholds_show_and_refit(tmp_path):
    out = run("thresholds", "show", "minilm")
    assert out.exit_code == 0 and "0.973" in out.output
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "castle", "forest", "robot", "ship", "storm", "portrait"]
    rows = ["prompt,neighbour,reference_similarity"]
    for _ in range(60):
        a = " ".join(rng.choice(words, 4))
        b = " ".join(rng.choice(words, 4))
        rows.append(f"{a},{b},{rng.uniform(0.6, 1.0):.3f}")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("\n".join(rows) + "\n")
    target = tmp_path / "t.json"
    out = run(
        "thresholds",
        "refit",
        "--pairs",
        str(pairs),
        "--embedder",
        "hashing",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(target),
    )
    assert out.exit_code == 0, out.output
    fitted = json.loads(target.read_text())
    sims = [row["min_similarity"] for row in fitted["levels"]]
    assert fitted["embedder"] == "hashing" and sims == sorted(sims, reverse=True)


def test_simulate_writes_the_report_files(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(
        "\n".join(
            f"a {w} in the {v}" for w in ("cat", "dog", "fox") for v in ("snow", "rain", "sun")
        )
        + "\n"
    )
    out_dir = tmp_path / "sim"
    out = run(
        "simulate",
        "--policies",
        "argus+shed+admit,promptserve,promptserve-step+select",
        "--prompts",
        str(prompts),
        "--arrivals",
        "poisson",
        "--rate",
        "40",
        "--minutes",
        "3",
        "--embedder",
        "hashing",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(out_dir),
    )
    assert out.exit_code == 0, out.output
    report = json.loads((out_dir / "report.json").read_text())
    assert set(report["policies"]) == {"argus+shed+admit", "promptserve", "promptserve-step+select"}
    sel = report["policies"]["promptserve-step+select"]["selector"]
    assert sel["selections"] >= 10 and abs(sum(sel["chosen_share"].values()) - 1.0) < 0.01
    assert set(report["oracle"]) == {
        "effective_quality_upper_bound",
        "slo_violation_ratio_lower_bound",
        "window_s",
    }
    row = report["policies"]["promptserve"]
    assert (
        row["served_in_slo"] + row["served_late"] + row["refused"] + row["dropped"]
        == row["requests"]
    )
    assert (out_dir / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    md = (out_dir / "report.md").read_text()
    assert "| promptserve |" in md
    assert f"promptserve-step+select: {sel['selections']} selections" in md
    assert "## Glossary" in md and "- **oracle bound**:" in md  # the report explains itself
    assert md.splitlines()[2].startswith("Run: ") and "{" not in md  # no raw config JSON


def test_simulate_rejects_bad_flags(tmp_path):
    out = run("simulate", "--policies", "argus,magic", "--embedder", "hashing")
    assert out.exit_code == 2 and "policy 'magic'" in out.output
    out = run("simulate", "--quality-penalty", "harsh", "--embedder", "hashing")
    assert out.exit_code == 2 and "--quality-penalty" in out.output
    bad = tmp_path / "p.json"
    bad.write_text("{}")
    out = run("simulate", "--profile", str(bad), "--embedder", "hashing")
    assert out.exit_code == 2 and "field format" in out.output


def test_serve_application_builder_validates_its_arguments():
    from ray.serve import Application

    from promptserve.distributed.deploy import app_builder
    from promptserve.errors import InputError

    built = app_builder({"model": "tiny", "workers": "2", "ray_worker_cpus": "0.5"})
    assert isinstance(built, Application)  # Serve's string arguments are coerced and checked
    with pytest.raises(InputError, match="field workers"):
        app_builder({"workers": "0"})
    with pytest.raises(InputError, match="field bogus"):
        app_builder({"bogus": "1"})
    with pytest.raises(InputError, match="localhost only"):
        app_builder({"host": "0.0.0.0"})
    with pytest.raises(InputError, match="policy 'nope' is not one of"):
        app_builder({"policy": "nope"})
    with pytest.raises(InputError, match="field select_cpu"):
        app_builder({"policy": "promptserve-step+select", "select_cpu": "0"})
    assert isinstance(app_builder({"policy": "promptserve-step+select"}), Application)


def test_sweep_writes_every_point_and_the_plot(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"a {w} at {v}" for w in ("cat", "fox") for v in ("dusk", "noon")))
    out_dir = tmp_path / "sweep"
    policies = "clipper-ht+shed+admit,argus,promptserve"
    out = run(
        "sweep", "--policies", policies, "--prompts", str(prompts), "--rates", "20,60",
        "--seeds", "1,2", "--minutes", "2", "--embedder", "hashing",
        "--cache-dir", str(tmp_path / "c"), "--out", str(out_dir),
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    result = json.loads((out_dir / "sweep.json").read_text())
    assert [(p["rate_qpm"], p["seed"]) for p in result["points"]] == [
        (20.0, 1), (20.0, 2), (60.0, 1), (60.0, 2)
    ]  # fmt: skip
    for point in result["points"]:
        assert point["measured_qpm"] > 0
        assert set(point["policies"]) == set(policies.split(","))
        bound = point["oracle"]["effective_quality_upper_bound"]
        for row in point["policies"].values():
            assert row["effective_quality"] <= bound + 1e-6
            assert row["lost"] == 0
    summary = {row["rate_qpm"]: row for row in result["summary"]}
    eq = [p["policies"]["argus"]["effective_quality"] for p in result["points"][2:]]
    assert summary[60.0]["policies"]["argus"]["effective_quality"]["min"] == min(eq)
    # the best fair rival is the best of those with the queue and admission, never argus
    fair = {n: summary[60.0]["policies"][n]["effective_quality"]["mean"] for n in
            ("clipper-ht+shed+admit", "promptserve")}  # fmt: skip
    best = summary[60.0]["best_fair_baseline"]
    assert best["effective_quality"] == max(fair.values()) and fair[best["policy"]] == max(
        fair.values()
    )
    assert (out_dir / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    page = (out_dir / "sweep.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page


def test_sweep_rejects_bad_flags(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    base = ["sweep", "--prompts", str(prompts), "--embedder", "hashing", "--out", str(tmp_path)]
    cases = [
        ([], "need --rates"),
        (["--rates", "20,abc"], "--rates '20,abc' is not a comma-separated list"),
        (["--rates", "0"], "each > 0"),
        (["--rates", "20", "--seeds", "x"], "--seeds"),
        (["--rates", "20", "--policies", "argus+slow"], "modifier 'slow'"),
        (["--rates", "20", "--quality-penalty", "harsh"], "not mild or steep"),
        (["--rates", "20", "--split", "half"], "--split 'half' is not one of"),
        (["--rates", "20", "--cached-step-share", "sd9"], "--cached-step-share 'sd9'"),
        (["--rates", "20", "--cached-step-share", "1.5"], "must be in (0, 1)"),
    ]
    for extra, message in cases:
        out = run(*base, *extra)
        assert out.exit_code == 2, extra
        assert message in out.output, (extra, out.output)


def test_serve_checks_the_port_and_the_model_folder_before_loading_anything(tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        res = CliRunner().invoke(
            app,
            ["serve", "--port", str(port), "--embedder", "hashing", "--cache-dir", str(tmp_path)],
        )
    finally:
        busy.close()
    assert res.exit_code == 2 and f"port {port} on 127.0.0.1 is not free" in res.output
    res = CliRunner().invoke(
        app,
        ["serve", "--model", str(tmp_path / "nope"), "--embedder", "hashing", "--port", "18765"],
    )
    assert (
        res.exit_code == 2 and "not found" in res.output and "nothing is downloaded" in res.output
    )


def test_without_a_terminal_progress_is_a_line_per_tenth_and_every_30_s(capsys):
    from promptserve.cli.common import LineProgress, progress

    assert isinstance(progress(), LineProgress)  # pytest's stderr is not a terminal
    now = [0.0]
    bar = LineProgress(clock=lambda: now[0])
    task = bar.add_task("simulating", total=100)
    for _ in range(100):
        bar.advance(task)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[-1] == "simulating: 100/100 (100%)"
    slow = bar.add_task("slow", total=1000)
    bar.advance(slow)  # 0.1%: no line yet
    now[0] = 31.0
    bar.advance(slow)  # 30 s passed: a line anyway
    assert capsys.readouterr().err.strip() == "slow: 2/1000 (0%)"


def test_an_80_column_terminal_keeps_the_policy_names_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\na red fox in snow\na castle\n")
    out = run(
        "simulate",
        "--policies",
        "clipper-ha+shed+admit,clipper-ht+shed+admit",
        "--prompts",
        str(prompts),
        "--arrivals",
        "poisson",
        "--rate",
        "20",
        "--minutes",
        "1",
        "--embedder",
        "hashing",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "sim"),
    )
    assert out.exit_code == 0, out.output
    assert "clipper-ha+shed+admit" in out.output and "clipper-ht+shed+admit" in out.output
    assert not re.search(r"\d\.\d{3,}", out.output.split("report written")[0].split("┃ policy")[1])


def test_the_port_check_lets_a_crashed_servers_lingering_connections_be():
    """A server that closed its side of a connection first leaves that socket in FIN-WAIT-2
    while the client holds on; the restart must bind as uvicorn does, not be refused."""
    import socket

    from promptserve.cli.listen import check_port_free

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server's side closes first, as a killed server's kernel does
    listener.close()
    try:
        plain = socket.socket()
        with pytest.raises(OSError):  # the condition is real: a plain bind is refused
            plain.bind(("127.0.0.1", port))
        plain.close()
        check_port_free("127.0.0.1", port)  # and the check is not
    finally:
        client.close()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--public-url", "ftp://images.example.com"], "public_url"),
        (["--trusted-proxies", "10.0.0.0/8,proxy.example"], "'proxy.example'"),
        (["--max-header-bytes", "10"], "--max-header-bytes"),
    ],
)
def test_serve_names_a_bad_connection_setting_before_loading(tmp_path, flags, named):
    res = CliRunner().invoke(
        app, ["serve", "--embedder", "hashing", "--cache-dir", str(tmp_path), *flags]
    )
    assert res.exit_code == 2 and named in res.output


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps", "gpu"])
def test_a_device_this_torch_cannot_use_is_one_line_and_exit_2(device):
    """On this CPU build every one is refused; where torch can use one (a CUDA build with
    enough GPUs, Apple silicon), the check must let it through instead."""
    import torch

    from promptserve.engine.devices import check_device

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    usable = {
        "cuda": cuda >= 1,
        "cuda:3": cuda >= 4,
        "mps": torch.backends.mps.is_available(),
        "gpu": False,
    }[device]
    if usable:
        assert check_device(device) is None  # passes, raising nothing
        return
    out = run("serve", "--device", device)
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1
    assert f"--device {device}" in out.output or repr(device) in out.output


def test_version_and_a_busy_port_refused_in_one_line_before_ray_starts():
    import socket

    out = CliRunner().invoke(app, ["--version"])
    assert out.exit_code == 0 and re.fullmatch(r"promptserve \d+\.\d+\.\d+\n", out.output)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = CliRunner().invoke(
            app, ["serve", "--ray", "--port", str(port), "--embedder", "hashing"]
        )
    assert res.exit_code == 2 and "is not free" in res.output
    assert len(res.output.strip().splitlines()) == 1  # one line, no traceback
    import ray

    assert not ray.is_initialized()  # refused before Ray started


def test_image_links_default_to_the_configured_address_never_a_request_header():
    from promptserve.cli.listen import default_public_url

    assert default_public_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert default_public_url("::1", 9000) == "http://[::1]:9000"
    assert default_public_url("0.0.0.0", 80).startswith("http://") and "0.0.0.0" not in (
        default_public_url("0.0.0.0", 80)
    )
