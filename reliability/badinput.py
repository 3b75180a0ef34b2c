"""Bad input: schemathesis against the server's own OpenAPI document, hypothesis on the parsers."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from promptserve.server import ServerConfig, build_app
from promptserve.server.live import LiveServer

ROOT = Path(__file__).resolve().parents[1]


def junit_counts(path: Path) -> dict:
    suites = ET.parse(path).getroot()
    cases = list(suites.iter("testcase"))
    failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    return {"cases": len(cases), "failed": len(failed)}


def schemathesis(max_examples: int = 25) -> dict:
    """Every operation, bounded examples, the check that no answer is a 5xx."""
    out = Path(tempfile.mkdtemp(prefix="st-"))
    cfg = ServerConfig(
        backend="modeled",
        model="sdxl-reference",
        embedder="hashing",
        cache_dir=out / "cache",
        slo_s=60,
        speedup=100.0,
        workers=2,
    )
    with LiveServer(build_app(cfg)) as url:
        st = Path(sys.executable).with_name("st")
        done = subprocess.run(
            [
                str(st),
                "run",
                f"{url}/openapi.json",
                "--max-examples",
                str(max_examples),
                "--checks",
                "not_a_server_error",
                "--seed",
                "1",
                "--report",
                "junit",
                "--report-junit-path",
                str(out / "junit.xml"),
            ],
            capture_output=True,
            text=True,
            cwd=out,
            timeout=240,
        )
    counts = junit_counts(out / "junit.xml")
    generated = [line for line in done.stdout.splitlines() if "generated" in line]
    return {
        "operations": counts["cases"],
        "operations_with_5xx": counts["failed"],
        "exit_code": done.returncode,
        "cases": generated[-1].strip() if generated else None,
    }


def parser_fuzz() -> dict:
    out = Path(tempfile.mkdtemp(prefix="fuzz-")) / "junit.xml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests/test_parsers_fuzz.py"),
            f"--junitxml={out}",
        ],
        capture_output=True,
        cwd=ROOT,
        timeout=300,
    )
    counts = junit_counts(out)
    return {"parsers_tested": counts["cases"], "parsers_failed": counts["failed"]}
