"""Every figure block of the README and docs/ is what its committed JSON file gives
(``sim/figures.py``), and the headline's file says what the docs say it does."""

import json
from pathlib import Path

import pytest

from promptserve.policy.policies import is_fair_rival
from promptserve.sim.figures import FIGURES, LEAD, RENDERERS, blocks, render, stale

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_doc_figure_differs_from_its_file(doc):
    found = blocks(doc.read_text(encoding="utf-8"))
    for name in found:
        assert name in RENDERERS, f"{doc.name}: unknown figure block {name!r}"
        file = RENDERERS[name][0]
        assert not file or (ROOT / FIGURES / file).is_file(), f"{file} is not committed"
    assert stale(doc, ROOT) == [], f"{doc.name}: rerun the benchmark with --docs"


def test_the_headline_is_in_the_readme_and_the_comparison():
    for doc, name in (("README.md", "headline-compact"), ("docs/comparison.md", "headline")):
        body = blocks((ROOT / doc).read_text(encoding="utf-8")).get(name, "")
        assert body.startswith("held-out split"), doc
        assert LEAD in body and "oracle bound" in body


def test_a_changed_figure_is_caught(tmp_path):
    doc = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    body = blocks(text)["headline-compact"]
    row = body.index("| Poisson")  # the first figure of the table's first row
    digit = next(i for i in range(row, len(body)) if body[i].isdigit())
    wrong = body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1 :]
    doc.write_text(text.replace(body, wrong), encoding="utf-8")
    assert stale(doc, ROOT) == ["headline-compact"]
    assert render("headline-compact", ROOT) == body


def test_the_policies_file_is_held_out_with_three_seeds_and_the_best_fair_rival():
    data = json.loads((ROOT / FIGURES / "policies.json").read_text())
    assert len(set(data["seeds"])) == 3
    assert set(data["results"]) == {"held-out", "tune"}
    assert data["oracle_breaches"] == 0
    for split in data["results"].values():
        assert set(split) == {"off", "on"}
        for fc, sweeps in split.items():
            names = data["policies"][fc]
            assert any(n.endswith("+max-r") for n in names) == (fc == "on")
            for rows in sweeps.values():
                for row in rows:
                    eq = {n: s["mean"] for n, s in row["effective_quality"].items()}
                    fair = {n: v for n, v in eq.items() if is_fair_rival(n)}
                    assert row["best_rival"] == max(fair, key=fair.__getitem__)
                    assert row["margin"] == pytest.approx(eq[LEAD] - fair[row["best_rival"]])
                    assert all(v <= row["oracle"] + 1e-6 for v in eq.values())


@pytest.mark.parametrize("name", sorted(n for n in RENDERERS if n.startswith("hindsight-")))
def test_a_hindsight_file_brackets_each_run_and_names_the_better_rival(name):
    data = json.loads((ROOT / FIGURES / RENDERERS[name][0]).read_text())
    assert data["split"] == "held-out" and len({r["seed"] for r in data["runs"]}) == 3
    for run in data["runs"]:  # the search starts from the online run: never below it
        assert run["online"] <= run["hindsight"] <= run["oracle"] + 1e-9
    for point, mean in data["points"].items():
        runs = [r for r in data["runs"] if r["point"] == point]
        means = {n: sum(r["rivals"][n] for r in runs) / len(runs) for n in runs[0]["rivals"]}
        assert mean["rival_name"] == max(means, key=means.__getitem__)
        assert mean["rival"] == pytest.approx(means[mean["rival_name"]], abs=1e-3)
