"""README says what the code does now: its explain() sample is a fresh run's."""

from __future__ import annotations

from pathlib import Path

from benchmarks import readme_sample

ROOT = Path(__file__).resolve().parent.parent


def test_readme_explain_sample_is_what_the_demo_prints_now():
    # The figures move with every change to what a rewrite saves: compare
    # against a fresh run, never against numbers written down here.
    held = readme_sample.sample((ROOT / "README.md").read_text()).splitlines()
    fresh = readme_sample.render().splitlines()
    stale = [f"README: {a!r}\n   now: {b!r}" for a, b in zip(held, fresh) if a != b]
    assert len(held) == len(fresh) and not stale, (
        "README's explain() sample is stale; run `python -m benchmarks.readme_sample`\n" + "\n".join(stale)
    )


def test_the_script_rewrites_only_the_sample_and_check_tells_stale_from_fresh(tmp_path, capsys, monkeypatch):
    readme = tmp_path / "README.md"
    before = f"intro\n\n{readme_sample.BEGIN}\n```\nold row\n```\n{readme_sample.END}\n\noutro\n"
    readme.write_text(before)
    monkeypatch.setattr(readme_sample, "render", lambda: "```\nnew row\n```")

    assert readme_sample.main(["--readme", str(readme), "--check"]) == 1
    assert readme.read_text() == before
    assert "-old row" in capsys.readouterr().out

    assert readme_sample.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == before.replace("old row", "new row")
    assert readme_sample.main(["--readme", str(readme), "--check"]) == 0
